from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from jobs.models import Job


@login_required
def job_list(request):
    jobs = Job.objects.filter(user=request.user).order_by("-created_at")[:50]
    return render(request, "jobs/list.html", {"jobs": jobs})


@login_required
def job_new(request):
    return render(request, "jobs/new.html")
