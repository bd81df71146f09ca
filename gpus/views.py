"""Staff dashboard page, its JSON snapshot, and the Prometheus scrape endpoint."""

from django.contrib.admin.views.decorators import staff_member_required
from django.http import JsonResponse
from django.shortcuts import render

from gpus.dashboard import QUEUE_SHOWN, RUNNING_SHOWN, dashboard_snapshot


@staff_member_required
def dashboard(request):
    # The page is a frame; dashboard.js fills it from the snapshot and then the socket.
    return render(request, "gpus/dashboard.html", {"queue_shown": QUEUE_SHOWN, "running_shown": RUNNING_SHOWN})


@staff_member_required
def dashboard_snapshot_view(request):
    return JsonResponse(dashboard_snapshot())
