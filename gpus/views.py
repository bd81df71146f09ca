from django.contrib.admin.views.decorators import staff_member_required
from django.shortcuts import render

from gpus.models import Device


@staff_member_required
def dashboard(request):
    devices = Device.objects.select_related("node")
    return render(request, "gpus/dashboard.html", {"devices": devices})
