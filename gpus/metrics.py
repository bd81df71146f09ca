"""/metrics in Prometheus text format, read from the database at scrape time.

A custom Collector rather than module-level Gauges and Counters: the figures belong to
the pool, not to the web process that happens to answer the scrape, and every process
(workers, agents, several web servers) writes the same database. Counts are derived from
rows (the job processing-time histogram covers every completed job still stored, so it
only grows, as Prometheus expects; deleting jobs reads as a counter reset).
"""

import hmac

from django.conf import settings
from django.db.models import Sum
from django.http import HttpResponse
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from gpus import figures
from gpus.models import Alert, Node
from gpus.services import device_figures, devices_with_allocated
from jobs.models import Job

MIB = 1024 * 1024
PROCESSING_BUCKETS = [5, 10, 30, 60, 120, 300, 600, 1800, 3600]
DEVICE_LABELS = ["node", "device", "name", "kind"]


class PoolCollector(Collector):
    def collect(self):
        yield from _device_metrics()
        yield from _node_metrics()
        yield from _job_metrics()
        firing = GaugeMetricFamily("whisperhub_alerts_firing", "Alerts firing now.")
        firing.add_metric([], Alert.objects.filter(state=Alert.State.FIRING).count())
        yield firing


def _device_metrics():
    memory = {
        figure: GaugeMetricFamily(f"whisperhub_device_memory_{figure}_bytes", help_text, labels=DEVICE_LABELS)
        for figure, help_text in [
            ("total", "Memory the device has."),
            ("reserved", "Memory held back from WhisperHub (admin setting)."),
            ("allocatable", "(total − reserved) × safety factor − foreign use: what the ledger may hand out."),
            ("allocated", "Sum of active reservations in the ledger."),
            ("available", "allocatable − allocated, not below 0."),
            ("foreign_used", "Memory used by processes WhisperHub did not start (NVML)."),
            ("driver_used", "Memory in use as the driver (NVML) reports it."),
        ]
    }
    usage = GaugeMetricFamily("whisperhub_device_memory_usage_ratio", "allocated ÷ allocatable.", labels=DEVICE_LABELS)
    utilisation = GaugeMetricFamily("whisperhub_device_utilization_ratio", "Compute utilisation, 0–1.", labels=DEVICE_LABELS)
    temperature = GaugeMetricFamily("whisperhub_device_temperature_celsius", "Device temperature.", labels=DEVICE_LABELS)
    grantable = GaugeMetricFamily(
        "whisperhub_device_accepting_work", "1 when enabled and not draining.", labels=DEVICE_LABELS
    )
    for device in devices_with_allocated():
        labels = [device.node.name, f"{device.node.name}:{device.index}", device.name, device.kind]
        f = device_figures(device)
        for figure, value in [
            ("total", f.total_mb),
            ("reserved", f.reserved_mb),
            ("allocatable", f.allocatable_mb),
            ("allocated", f.allocated_mb),
            ("available", f.available_mb),
            ("foreign_used", f.foreign_used_mb),
            ("driver_used", device.used_mb),
        ]:
            if value is not None:
                memory[figure].add_metric(labels, value * MIB)
        usage.add_metric(labels, f.usage_percent / 100)
        if device.utilization_pct is not None:
            utilisation.add_metric(labels, device.utilization_pct / 100)
        if device.temperature_c is not None:
            temperature.add_metric(labels, device.temperature_c)
        grantable.add_metric(labels, 1 if device.enabled and not device.draining else 0)
    yield from memory.values()
    yield from (usage, utilisation, temperature, grantable)


def _node_metrics():
    online = GaugeMetricFamily("whisperhub_node_online", "1 when the node's agent reported recently.", labels=["node"])
    for node in Node.objects.all():
        online.add_metric([node.name], 1 if node.online else 0)
    yield online


def _job_metrics():
    queue = GaugeMetricFamily("whisperhub_queue_length", "Jobs waiting to be placed.")
    queue.add_metric([], figures.queue_length())
    yield queue
    by_state = GaugeMetricFamily("whisperhub_jobs", "Jobs stored, by state.", labels=["state"])
    for state, count in figures.jobs_by_state().items():
        by_state.add_metric([state], count)
    yield by_state

    cumulative, count, total = figures.processing_histogram(PROCESSING_BUCKETS)
    histogram = HistogramMetricFamily(
        "whisperhub_job_processing_seconds", "Placement to completion of completed jobs."
    )
    buckets = [(str(float(b)), c) for b, c in zip(PROCESSING_BUCKETS, cumulative)] + [("+Inf", count)]
    histogram.add_metric([], buckets, total)
    yield histogram

    # `attempt` only grows (it is the fencing token), so these are true counters.
    sums = Job.objects.aggregate(attempts=Sum("attempt"))
    attempts = sums["attempts"] or 0
    placed = Job.objects.filter(attempt__gt=0).count()
    yield CounterMetricFamily("whisperhub_job_attempts", "Placements of jobs (first tries and retries).", value=attempts)
    yield CounterMetricFamily("whisperhub_job_retries", "Placements beyond each job's first.", value=attempts - placed)

    now = timezone.now()
    recent = figures.finished_between(now - figures.RATE_WINDOW, now)
    window = f"{int(figures.RATE_WINDOW.total_seconds() // 60)}m"
    errors = GaugeMetricFamily("whisperhub_job_error_ratio", "Failed ÷ ended jobs over the window.", labels=["window"])
    errors.add_metric([window], recent.error_rate)
    retries = GaugeMetricFamily("whisperhub_job_retry_ratio", "Retries ÷ placements of ended jobs over the window.", labels=["window"])
    retries.add_metric([window], recent.retry_rate)
    failed = GaugeMetricFamily("whisperhub_jobs_ended", "Jobs that ended over the window, by outcome.", labels=["window", "state"])
    failed.add_metric([window, "completed"], recent.completed)
    failed.add_metric([window, "failed"], recent.failed)
    yield from (errors, retries, failed)


registry = CollectorRegistry(auto_describe=False)
registry.register(PoolCollector())


def metrics_view(request):
    """Prometheus scrape endpoint; with WHISPERHUB_METRICS_TOKEN set, a Bearer token or a staff session."""
    token = settings.WHISPERHUB_METRICS_TOKEN
    if token and not request.user.is_staff:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            return HttpResponse("metrics need a bearer token\n", status=401, content_type="text/plain")
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
