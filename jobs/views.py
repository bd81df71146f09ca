"""Portal pages: new job, my jobs, one job. Writes go through jobs.services, reads through selectors."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST
from whisper.utils import format_timestamp

from jobs import services
from jobs.apis import job_queue_info
from jobs.forms import JobNewForm
from jobs.models import Job
from jobs.outputs import FORMATS
from jobs.selectors import job_get_for_user, jobs_for_user

PAGE_SIZE = 20


@login_required
def job_list(request):
    state = request.GET.get("state", "")
    jobs = jobs_for_user(user=request.user).prefetch_related("files")
    if state in Job.State.values:
        jobs = jobs.filter(state=state)
    page = Paginator(jobs, PAGE_SIZE).get_page(request.GET.get("page"))
    queue = job_queue_info() if any(job.state == Job.State.PENDING for job in page) else {}
    rows = [(job, queue.get(job.pk)) for job in page]
    context = {"page": page, "rows": rows, "state": state, "states": Job.State.choices}
    return render(request, "jobs/list.html", context)


@login_required
def job_new(request):
    if request.method != "POST":
        return render(request, "jobs/new.html", {"form": JobNewForm(), **_limits()})
    wants_json = request.headers.get("X-Requested-With") == "XMLHttpRequest"
    # More parts than DATA_UPLOAD_MAX_NUMBER_FILES never reach this view: the CSRF check reads
    # the body first and Django answers 400 itself. The page's script checks the count before sending.
    form = JobNewForm(request.POST, request.FILES)
    if not form.is_valid():
        return _form_invalid(request, form, wants_json)
    data = form.cleaned_data
    try:
        job = services.job_create(
            user=request.user,
            files=data["files"],
            model_name=data["model"],
            language=data["language"],
            task=data["task"],
            priority=data["priority"],
            initial_prompt=data["initial_prompt"],
            word_timestamps=data["word_timestamps"],
            output_formats=data["output_formats"] or list(FORMATS),
            name=data["name"],
            source=Job.Source.PORTAL,
        )
    except services.JobInputError as exc:
        form.add_error(exc.field if exc.field in form.fields else None, exc.message)
        return _form_invalid(request, form, wants_json)
    url = reverse("jobs:detail", args=[job.pk])
    if wants_json:
        return JsonResponse({"id": job.pk, "url": url}, status=201)
    return redirect(url)


def _limits() -> dict:
    return {"max_files": settings.MAX_FILES_PER_JOB, "max_upload_mb": settings.MAX_UPLOAD_MB}


def _form_invalid(request, form, wants_json):
    if wants_json:
        return JsonResponse({"errors": form.errors.get_json_data()}, status=400)
    return render(request, "jobs/new.html", {"form": form, **_limits()}, status=400)


@login_required
def job_detail(request, job_id):
    job = job_get_for_user(user=request.user, job_id=job_id)
    formats = job.output_formats or list(FORMATS)
    context = {
        "job": job,
        "files": [_file_view(audio_file, formats) for audio_file in job.files.all()],
        "queue": job_queue_info().get(job.pk) if job.state == Job.State.PENDING else None,
        "can_retry": job.state in (Job.State.FAILED, Job.State.CANCELLED),
        "can_cancel": not job.is_final,
        "events": job.events.all(),
    }
    return render(request, "jobs/detail.html", context)


def _file_view(audio_file, formats) -> dict:
    """A file with its download links and its transcript as (start, end, text) rows."""
    if audio_file.result is None:
        return {"file": audio_file, "downloads": [], "segments": []}
    url = reverse("api-job-file-download", args=[audio_file.job_id, audio_file.pk])
    segments = [
        (format_timestamp(s["start"]), format_timestamp(s["end"]), s["text"].strip())
        for s in audio_file.result.get("segments", [])
    ]
    return {"file": audio_file, "downloads": [(fmt, f"{url}?format={fmt}") for fmt in formats], "segments": segments}


@login_required
@require_POST
def job_cancel(request, job_id):
    job = job_get_for_user(user=request.user, job_id=job_id)
    _run(request, lambda: services.job_cancel(job=job), f"Job {job.pk} cancelled.")
    return redirect("jobs:detail", job.pk)


@login_required
@require_POST
def job_retry(request, job_id):
    job = job_get_for_user(user=request.user, job_id=job_id)
    _run(request, lambda: services.job_retry(job=job), f"Job {job.pk} queued again.")
    return redirect("jobs:detail", job.pk)


@login_required
@require_POST
def job_delete(request, job_id):
    job = job_get_for_user(user=request.user, job_id=job_id)
    if _run(request, lambda: services.job_delete(job=job), f"Job {job.pk} and its files deleted."):
        return redirect("jobs:list")
    return redirect("jobs:detail", job.pk)


def _run(request, action, success_message) -> bool:
    """Run a service; an illegal transition (say, cancelling a finished job) becomes a message."""
    try:
        action()
    except services.JobStateError as exc:
        messages.error(request, str(exc))
        return False
    except services.JobInputError as exc:  # a retry whose model was since disabled or removed
        messages.error(request, exc.message)
        return False
    messages.success(request, success_message)
    return True
