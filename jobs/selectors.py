"""Reads of jobs. job_get_for_user is the one permission check shared by pages, API and sockets."""

import heapq
from datetime import datetime, timedelta

from django.db.models import QuerySet, Sum
from django.http import Http404
from django.utils import timezone

from jobs.dispatch import pending_ordered
from jobs.models import AudioFile, Job, SchedulerSettings
from jobs.services import largest_capacity_mb

# Speed assumed for a model with no finished job in the window: as slow as real time.
DEFAULT_REALTIME_FACTOR = 1.0
DEFAULT_LOAD_S = 5.0
SPEED_WINDOW = timedelta(days=7)


def job_get_for_user(*, user, job_id) -> Job:
    """The job if `user` owns it or is staff; Http404 otherwise (no hint that it exists)."""
    if not getattr(user, "is_authenticated", False):
        raise Http404("No such job.")
    try:
        job_id = int(job_id)
    except (TypeError, ValueError):
        raise Http404("No such job.") from None
    jobs = Job.objects.select_related("user", "device", "device__node")
    if not user.is_staff:
        jobs = jobs.filter(user=user)
    job = jobs.filter(id=job_id).first()
    if job is None:
        raise Http404("No such job.")
    return job


def jobs_for_user(*, user) -> QuerySet:
    """The user's own jobs, newest first (staff see everyone's through the dashboard, not here)."""
    return Job.objects.filter(user=user).select_related("device").order_by("-created_at")


def pending_queue(*, now: datetime | None = None) -> list[Job]:
    """Pending jobs in dispatch order, each with `position` (1-based), `effective_weight` and
    `estimated_start` (None when no device can ever hold it).

    The estimate is rough by design: it replays the queue onto max_concurrent_tasks slots,
    each job lasting its audio length × its model's recent speed, and ignores memory fit.
    """
    now = now or timezone.now()
    scheduler = SchedulerSettings.load()
    jobs = list(pending_ordered(now=now, scheduler=scheduler).select_related("user").annotate(audio_s=Sum("files__duration_s")))
    if not jobs:
        return jobs
    largest = largest_capacity_mb()
    speed = _realtime_factors(now)
    # Each slot holds the time it next comes free; running jobs fill slots first.
    slots = [now] * scheduler.max_concurrent_tasks
    for running in Job.objects.filter(state__in=Job.ACTIVE_STATES).annotate(audio_s=Sum("files__duration_s")):
        if slots:
            heapq.heapreplace(slots, max(now, (running.started_at or now) + _expected_run(running, speed)))
    for position, job in enumerate(jobs, start=1):
        job.position = position
        job.estimated_start = None
        if not slots or (largest is not None and job.memory_mb > largest):
            continue
        job.estimated_start = max(slots[0], job.not_before or now)
        heapq.heapreplace(slots, job.estimated_start + _expected_run(job, speed))
    return jobs


def _expected_run(job: Job, speed: dict[str, float]) -> timedelta:
    seconds = DEFAULT_LOAD_S + (job.audio_s or 0.0) * speed.get(job.model_name, DEFAULT_REALTIME_FACTOR)
    return timedelta(seconds=seconds)


def _realtime_factors(now: datetime) -> dict[str, float]:
    """Seconds of transcription per second of audio, per model, over jobs finished in the window."""
    recent = {"state": Job.State.COMPLETED, "finished_at__gte": now - SPEED_WINDOW, "transcribe_seconds__isnull": False}
    busy = dict(
        Job.objects.filter(**recent).values("model_name").annotate(s=Sum("transcribe_seconds")).values_list("model_name", "s")
    )
    audio = dict(
        AudioFile.objects.filter(**{f"job__{k}": v for k, v in recent.items()})
        .values("job__model_name")
        .annotate(s=Sum("duration_s"))
        .values_list("job__model_name", "s")
    )
    return {name: busy[name] / audio[name] for name in busy if audio.get(name)}
