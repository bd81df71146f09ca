"""The dispatcher: which pending job runs next, and on which device.

django-q2's ORM broker has no order and no priority, so the decision is made here and q2 only
carries "run job N attempt K" to the chosen device's node. docs/SCHEDULING.md has the rules.

It runs inline, with no queue hop: after a submission commits (jobs.services.job_create), after
a job ends or is cancelled (memory was freed), and in the periodic sweep of every node's GPU agent
(sweep()). Any number of dispatchers may run at once: each placement is one transaction that
locks the scheduler settings row (the concurrency cap is a count, and two dispatchers counting
at once would both see room), then the job row (skip_locked), then reserves through the ledger,
which locks the device rows. Lock order: settings → job → devices, as in jobs/services.py.
"""

import logging
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial

from django.conf import settings
from django.db import transaction
from django.db.models import Case, DurationField, ExpressionWrapper, F, IntegerField, Q, QuerySet, Value, When
from django.db.models.functions import Extract, Floor, Greatest
from django.utils import timezone
from django_q.tasks import async_task

from gpus.models import Device
from gpus.services import MemoryFigures, allocation_reserve_first_fit, memory_figures
from jobs import services
from jobs.models import Job, JobEvent, SchedulerSettings
from whisperhub import live

logger = logging.getLogger(__name__)

# Pending jobs looked at per pass, in dispatch order: a queue longer than this is served from its head.
SCAN_LIMIT = 500
TEMPERATURE_LIMIT_C = 85.0
# The score's "priority" part is a device priority: a real GPU before a simulated one before the CPU.
DEVICE_PRIORITY = {Device.Kind.CUDA: 1.0, Device.Kind.SIMULATED: 0.5, Device.Kind.CPU: 0.0}
# Telemetry not reported (yet): neither rewarded nor punished.
UNKNOWN_TELEMETRY = 0.5
# q2 kills a task this long after the job's own timeout; by then the sweep has failed the job.
TASK_TIMEOUT_MARGIN_S = 30


# --- Order ----------------------------------------------------------------------------------------


def pending_ordered(*, now: datetime, scheduler: SchedulerSettings) -> QuerySet:
    """Pending jobs in dispatch order, annotated with `effective_weight`.

    effective weight = priority weight + one per full aging_s waited since queued_at; highest
    first, then the longest waiting, then the lowest id. So a low job waiting 2 × aging_s ties
    with a fresh high one and, having waited longer, goes first: nothing starves.
    """
    weight = Case(
        When(priority=Job.Priority.HIGH, then=Value(scheduler.priority_weight_high)),
        When(priority=Job.Priority.NORMAL, then=Value(scheduler.priority_weight_normal)),
        default=Value(scheduler.priority_weight_low),
        output_field=IntegerField(),
    )
    if scheduler.aging_s:
        waited = Extract(ExpressionWrapper(Value(now) - F("queued_at"), output_field=DurationField()), "epoch")
        weight = weight + Greatest(Floor(waited / scheduler.aging_s), Value(0), output_field=IntegerField())
    return (
        Job.objects.filter(state=Job.State.PENDING)
        .annotate(effective_weight=weight)
        .order_by("-effective_weight", "queued_at", "id")
    )


# --- Placement score --------------------------------------------------------------------------------


def device_score(device: Device, figures: MemoryFigures) -> float:
    """The seed's score: 40% free-memory ratio, 30% idle, 20% temperature headroom, 10% device priority."""
    free = figures.available_mb / figures.allocatable_mb if figures.allocatable_mb else 0.0
    if device.utilization_pct is None:
        idle = UNKNOWN_TELEMETRY
    else:
        idle = min(1.0, max(0.0, 1 - device.utilization_pct / 100))
    if device.temperature_c is None:
        cool = UNKNOWN_TELEMETRY
    else:
        cool = max(0.0, (TEMPERATURE_LIMIT_C - device.temperature_c) / TEMPERATURE_LIMIT_C)
    return 0.4 * free + 0.3 * idle + 0.2 * cool + 0.1 * DEVICE_PRIORITY.get(device.kind, 0.0)


# --- Dispatch --------------------------------------------------------------------------------------


@dataclass
class _Pass:
    """What one dispatch pass knows about the devices, updated as it places jobs."""

    devices: list[Device]
    figures: dict[int, MemoryFigures]
    held: set[int]  # devices kept free for a starving job that does not fit anywhere yet

    def fitting(self, mb: int) -> list[Device]:
        ranked = [d for d in self.devices if d.id not in self.held and self.figures[d.id].available_mb >= mb]
        return sorted(ranked, key=lambda d: (-device_score(d, self.figures[d.id]), d.id))

    def hold_for(self, mb: int) -> None:
        self.held |= {d.id for d in self.devices if self.figures[d.id].allocatable_mb >= mb}

    def granted(self, device_id: int, mb: int) -> None:
        old = self.figures[device_id]
        self.figures[device_id] = replace(old, allocated_mb=old.allocated_mb + mb, available_mb=max(0, old.available_mb - mb))


class _Full(Exception):
    """The cluster-wide concurrency cap is reached: this pass is over."""


def dispatch_pending(*, now: datetime | None = None) -> int:
    """Place as many pending jobs as memory and the concurrency cap allow; returns the number placed.

    A job that fits nowhere is skipped, so smaller jobs behind it may run (no head-of-line
    blocking) — except that once it has waited longer than aging_s, the devices it could fit on
    once their jobs end are held for it: nothing behind it is placed there (bounded backfill).
    """
    now = now or timezone.now()
    scheduler = SchedulerSettings.load()
    if Job.objects.filter(state__in=Job.ACTIVE_STATES).count() >= scheduler.max_concurrent_tasks:
        return 0
    devices = [d for d in Device.objects.select_related("node").filter(enabled=True, draining=False) if d.node.online]
    if not devices:
        return 0
    state = _Pass(devices=devices, figures=memory_figures([d.id for d in devices]), held=set())
    eligible = pending_ordered(now=now, scheduler=scheduler).filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
    placed = 0
    for job in eligible[:SCAN_LIMIT]:
        candidates = state.fitting(job.memory_mb)
        if not candidates:
            if (now - job.queued_at).total_seconds() > scheduler.aging_s:
                state.hold_for(job.memory_mb)
            continue
        try:
            device_id = _place(job, candidates, scheduler)
        except _Full:
            break
        except Exception:  # noqa: BLE001 - one job the ledger refuses must not stall the queue behind it
            logger.exception("job %s could not be placed; skipped in this pass", job.id)
            continue
        if device_id is not None:
            state.granted(device_id, job.memory_mb)
            placed += 1
    return placed


def _place(job: Job, candidates: list[Device], scheduler: SchedulerSettings) -> int | None:
    """Reserve memory for `job` on the best candidate that fits and mark it loading; returns the device id."""
    with transaction.atomic():
        SchedulerSettings.objects.select_for_update().filter(pk=1).first()
        running = Counter(Job.objects.filter(state__in=Job.ACTIVE_STATES).values_list("device__node_id", flat=True))
        if sum(running.values()) >= scheduler.max_concurrent_tasks:
            raise _Full
        # A node runs at most WHISPERHUB_WORKERS tasks at once; a reservation beyond that would
        # wait in the node's queue while its lease, which nobody renews yet, runs out.
        device_ids = [d.id for d in candidates if running[d.node_id] < settings.WHISPERHUB_WORKERS]
        # skip_locked: a job another dispatcher is placing right now is that dispatcher's.
        locked = (
            Job.objects.select_for_update(skip_locked=True)
            .filter(id=job.id, state=Job.State.PENDING, attempt=job.attempt)
            .first()
        )
        if locked is None or not device_ids:
            return None
        attempt = locked.attempt + 1
        allocation = allocation_reserve_first_fit(
            device_ids=device_ids, mb=locked.memory_mb, job_id=locked.id, attempt=attempt, lease_s=scheduler.lease_s
        )
        if allocation is None:
            return None
        started_at = timezone.now()
        Job.objects.filter(id=locked.id, state=Job.State.PENDING, attempt=locked.attempt).update(
            state=Job.State.LOADING,
            attempt=attempt,
            device_id=allocation.device_id,
            started_at=started_at,
            queue_seconds=(started_at - locked.queued_at).total_seconds(),
            not_before=None,
        )
        device = next(d for d in candidates if d.id == allocation.device_id)
        JobEvent.objects.create(
            job_id=locked.id,
            from_state=Job.State.PENDING,
            to_state=Job.State.LOADING,
            attempt=attempt,
            device_id=device.id,
            message=f"placed on {device} with {locked.memory_mb} MiB",
        )
        transaction.on_commit(
            partial(_enqueue, locked.id, attempt, device.node.cluster_name, scheduler.task_timeout_s + TASK_TIMEOUT_MARGIN_S)
        )
        live.job_changed(locked.id, user_id=locked.user_id)
        live.queue_changed()
    return allocation.device_id


def _enqueue(job_id: int, attempt: int, cluster: str, timeout: int) -> None:
    try:
        async_task(
            "jobs.tasks.run_job", job_id, attempt, cluster=cluster, task_name=f"job-{job_id}-{attempt}", timeout=timeout
        )
    except Exception:  # noqa: BLE001 - the lease is the safety net: unrenewed, it lapses and the sweep re-queues
        logger.exception("job %s attempt %s was placed but not enqueued; the sweep re-queues it", job_id, attempt)


# --- Entry points -----------------------------------------------------------------------------------


def dispatch_safely() -> int:
    """dispatch_pending() that logs instead of raising: a web request or a finishing task must not fail on it."""
    try:
        return dispatch_pending()
    except Exception:  # noqa: BLE001
        logger.exception("dispatch failed; the next sweep tries again")
        return 0


def dispatch_on_commit() -> None:
    """Dispatch once the caller's transaction commits (the memory it freed or the job it added is visible).

    Several calls in one transaction dispatch once: one pass places everything that fits.
    """
    connection = transaction.get_connection()
    if connection.in_atomic_block and any(func is dispatch_safely for _, func, _ in connection.run_on_commit):
        return
    transaction.on_commit(dispatch_safely, robust=True)


def sweep() -> int:
    """The periodic step (GPU agent loop, every poll interval): recover lost jobs, then dispatch."""
    try:
        services.jobs_recover_lost()
    except Exception:  # noqa: BLE001
        logger.exception("recovering lost jobs failed; the next sweep tries again")
    return dispatch_safely()
