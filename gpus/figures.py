"""Read-only pool figures shared by the dashboard, /metrics and the alert evaluator.

Everything is derived from rows at read time (jobs, allocations, samples): no counter kept
in memory, so every process (web, agent, scrape) sees the same numbers.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Count, F, Max, Q, Sum

from gpus.models import Device, MetricSample, Node
from gpus.services import memory_figures
from jobs.models import Job

RATE_WINDOW = timedelta(minutes=15)  # error and retry rates: recent enough to alert on, long enough to mean something
HOUR = timedelta(hours=1)
BUCKETS_PER_HOUR = 12  # five-minute points in the dashboard's charts


@dataclass(frozen=True)
class PoolMemory:
    usage: float  # Σ allocated ÷ Σ allocatable over all devices, 0..1 (0 when nothing is allocatable)
    device_max_usage: float  # the fullest single device, 0..1
    fullest_device_id: int | None


def pool_memory() -> PoolMemory:
    figures = list(memory_figures().values())
    allocatable = sum(f.allocatable_mb for f in figures)
    allocated = sum(f.allocated_mb for f in figures)
    fullest = max(figures, key=lambda f: f.usage_percent, default=None)
    return PoolMemory(
        usage=min(1.0, allocated / allocatable) if allocatable else 0.0,
        device_max_usage=fullest.usage_percent / 100 if fullest else 0.0,
        fullest_device_id=fullest.device_id if fullest else None,
    )


def queue_length() -> int:
    return Job.objects.filter(state=Job.State.PENDING).count()


def running_count() -> int:
    return Job.objects.filter(state__in=Job.ACTIVE_STATES).count()


def jobs_by_state() -> dict[str, int]:
    counts = dict(Job.objects.order_by().values_list("state").annotate(n=Count("id")))
    return {state: counts.get(state, 0) for state in Job.State.values}


def hottest_temperature() -> float | None:
    return Device.objects.filter(temperature_c__isnull=False).aggregate(t=Max("temperature_c"))["t"]


def nodes_offline() -> int:
    return sum(1 for node in Node.objects.all() if not node.online)


@dataclass(frozen=True)
class Finished:
    """Jobs that ended (completed or failed; cancelled ones are the user's choice, not an outcome) in a window."""

    completed: int
    failed: int
    attempts: int  # placements of those jobs: attempts − jobs = retries
    processing_s: float  # Σ placement → end over completed jobs
    audio_s: float  # Σ audio length of completed jobs

    @property
    def error_rate(self) -> float:
        ended = self.completed + self.failed
        return self.failed / ended if ended else 0.0

    @property
    def retry_rate(self) -> float:
        jobs = self.completed + self.failed
        return (self.attempts - jobs) / self.attempts if self.attempts > jobs else 0.0

    @property
    def avg_processing_s(self) -> float | None:
        return self.processing_s / self.completed if self.completed else None


def _finished_rows(since: datetime, until: datetime):
    """(finished_at, state, attempt, processing seconds, audio seconds) of jobs that ended in [since, until)."""
    rows = (
        Job.objects.filter(
            state__in=[Job.State.COMPLETED, Job.State.FAILED], finished_at__gte=since, finished_at__lt=until
        )
        .order_by()
        .annotate(audio_s=Sum("files__duration_s"))
        .values_list("finished_at", "state", "attempt", "started_at", "audio_s")
    )
    for finished_at, state, attempt, started_at, audio_s in rows:
        processing = (finished_at - started_at).total_seconds() if started_at else 0.0
        yield finished_at, state, max(attempt, 1), max(0.0, processing), audio_s or 0.0


def _summarise(rows) -> Finished:
    completed = failed = attempts = 0
    processing = audio = 0.0
    for _, state, attempt, seconds, audio_s in rows:
        attempts += attempt
        if state == Job.State.COMPLETED:
            completed += 1
            processing += seconds
            audio += audio_s
        else:
            failed += 1
    return Finished(completed, failed, attempts, processing, audio)


def finished_between(since: datetime, until: datetime) -> Finished:
    return _summarise(_finished_rows(since, until))


def hour_series(now: datetime) -> list[dict]:
    """The last hour in five-minute buckets, oldest first: throughput, processing time, rates, queue length.

    Job figures come from the rows of jobs that ended in each bucket (one query); queue length
    and memory use from the samples the evaluator recorded (one query). A bucket without a
    sample has queue_length None, which the chart draws as a gap rather than a false zero.
    """
    step = HOUR / BUCKETS_PER_HOUR
    start = now - HOUR
    by_bucket: list[list] = [[] for _ in range(BUCKETS_PER_HOUR)]
    for row in _finished_rows(start, now):
        by_bucket[min(BUCKETS_PER_HOUR - 1, int((row[0] - start) / step))].append(row)
    samples: list[list[MetricSample]] = [[] for _ in range(BUCKETS_PER_HOUR)]
    for sample in MetricSample.objects.filter(at__gte=start, at__lt=now):
        samples[min(BUCKETS_PER_HOUR - 1, int((sample.at - start) / step))].append(sample)
    series = []
    for i in range(BUCKETS_PER_HOUR):
        summary = _summarise(by_bucket[i])
        last = samples[i][-1] if samples[i] else None
        series.append(
            {
                "end": (start + step * (i + 1)).isoformat(),
                "completed": summary.completed,
                "failed": summary.failed,
                "audio_minutes": round(summary.audio_s / 60, 2),
                "avg_processing_s": round(summary.avg_processing_s, 2) if summary.completed else None,
                "error_rate": round(summary.error_rate, 4),
                "retry_rate": round(summary.retry_rate, 4),
                "queue_length": last.queue_length if last else None,
                "memory_usage": round(last.memory_usage, 4) if last else None,
            }
        )
    return series


def processing_histogram(buckets: list[float]) -> tuple[list[int], int, float]:
    """Cumulative counts of completed jobs by placement→end seconds (≤ each bucket), count and sum.

    Over every completed job still in the database, in one aggregate query: a Prometheus
    histogram must only grow (rate() reads a drop as a restart), which a window would break.
    """
    completed = Job.objects.filter(state=Job.State.COMPLETED, started_at__isnull=False, finished_at__isnull=False)
    aggregates = {f"le{i}": Count("id", filter=_duration_le(b)) for i, b in enumerate(buckets)}
    aggregates["n"] = Count("id")
    aggregates["total"] = Sum(F("finished_at") - F("started_at"))
    row = completed.aggregate(**aggregates)
    total = row["total"].total_seconds() if row["total"] else 0.0
    return [row[f"le{i}"] for i in range(len(buckets))], row["n"], total


def _duration_le(seconds: float) -> Q:
    return Q(finished_at__lte=F("started_at") + timedelta(seconds=seconds))
