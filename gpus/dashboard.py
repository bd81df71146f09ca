"""The staff dashboard's state as JSON: one snapshot, and the parts events refresh.

The snapshot endpoint and the staff socket both build from these functions, so the page
shows the same thing whether it loaded, reconnected, or was patched by an event. Lists are
capped (QUEUE_SHOWN, RUNNING_SHOWN) and always carry their full count.
"""

from datetime import datetime

from django.contrib.auth import get_user_model
from django.utils import timezone

from gpus import figures
from gpus.models import Alert, Allocation, Node
from gpus.services import devices_with_allocated, device_figures
from jobs.models import Job

QUEUE_SHOWN = 50
RUNNING_SHOWN = 50
ALERTS_SHOWN = 20


def dashboard_snapshot(*, now: datetime | None = None) -> dict:
    now = now or timezone.now()
    return {
        "type": "snapshot",
        "at": now.isoformat(),
        "nodes": nodes_state(),
        **queue_state(now=now),
        "figures": figures_state(now=now),
        "alerts": alerts_state(),
    }


def nodes_state() -> list[dict]:
    """Nodes with their devices: ledger figures, telemetry and the jobs holding memory."""
    holders: dict[int, list[dict]] = {}
    active = Allocation.objects.filter(released_at__isnull=True).select_related("job__user").order_by("created_at")
    for allocation in active:
        job = allocation.job
        holders.setdefault(allocation.device_id, []).append(
            {
                "allocation_id": allocation.pk,
                "mb": allocation.mb,
                "job_id": job.pk if job else None,
                "user": job.user.get_username() if job else None,
                "state": job.state if job else None,
                "progress": round(job.progress * 100, 1) if job else None,
            }
        )
    nodes = {node.pk: _node(node) for node in Node.objects.all()}
    for device in devices_with_allocated():
        nodes[device.node_id]["devices"].append(_device(device, holders.get(device.pk, [])))
    return list(nodes.values())


def _node(node: Node) -> dict:
    return {
        "id": node.pk,
        "name": node.name,
        "backend": node.backend,
        "online": node.online,
        "last_seen": node.last_seen.isoformat() if node.last_seen else None,
        "devices": [],
    }


def _device(device, holders: list[dict]) -> dict:
    memory = device_figures(device)
    return {
        "id": device.pk,
        "name": device.name,
        "index": device.index,
        "kind": device.kind,
        "enabled": device.enabled,
        "draining": device.draining,
        "total_mb": memory.total_mb,
        "reserved_mb": memory.reserved_mb,
        "allocatable_mb": memory.allocatable_mb,
        "allocated_mb": memory.allocated_mb,
        "available_mb": memory.available_mb,
        "foreign_used_mb": memory.foreign_used_mb,
        "usage_percent": memory.usage_percent,
        "used_mb": device.used_mb,  # what the driver (NVML) reports, beside the ledger's figure
        "utilization_pct": device.utilization_pct,
        "temperature_c": device.temperature_c,
        "telemetry_at": device.telemetry_at.isoformat() if device.telemetry_at else None,
        "holders": holders,
    }


def queue_state(*, now: datetime) -> dict:
    """The pending queue in dispatch order and the running jobs, each capped, with counts."""
    from jobs.selectors import pending_queue

    pending = pending_queue()
    shown = pending[:QUEUE_SHOWN]
    # One query for the owners' names, not one per row (pending_queue need not join users).
    names = dict(get_user_model().objects.filter(pk__in={job.user_id for job in shown}).values_list("pk", "username"))
    running = (
        Job.objects.filter(state__in=Job.ACTIVE_STATES)
        .select_related("user", "device__node")
        .order_by("started_at", "pk")
    )
    return {
        "queue": {
            "count": len(pending),
            "jobs": [_pending(job, position, names, now) for position, job in enumerate(shown, start=1)],
        },
        "running": {
            "count": running.count(),
            "jobs": [job_row(job, now=now) for job in running[:RUNNING_SHOWN]],
        },
    }


def _pending(job: Job, position: int, names: dict[int, str], now: datetime) -> dict:
    return {
        "id": job.pk,
        "position": position,
        "user": names.get(job.user_id, ""),
        "model": job.model_name,
        "priority": job.priority,
        "memory_mb": job.memory_mb,
        "wait_s": round((now - job.queued_at).total_seconds(), 1),
    }


def job_row(job: Job, *, now: datetime | None = None) -> dict:
    """A job as the dashboard shows it (staff only: owner's name included)."""
    now = now or timezone.now()
    return {
        "id": job.pk,
        "user": job.user.get_username(),
        "model": job.model_name,
        "state": job.state,
        "progress": round(job.progress * 100, 1),
        "attempt": job.attempt,
        "device_id": job.device_id,
        "device": str(job.device) if job.device_id else None,
        "memory_mb": job.memory_mb,
        "elapsed_s": round((now - job.started_at).total_seconds(), 1) if job.started_at else None,
        "error": job.error[:200],
    }


def figures_state(*, now: datetime) -> dict:
    recent = figures.finished_between(now - figures.HOUR, now)
    return {
        "queue_length": figures.queue_length(),
        "running": figures.running_count(),
        "by_state": figures.jobs_by_state(),
        "hour": {
            "completed": recent.completed,
            "failed": recent.failed,
            "audio_minutes": round(recent.audio_s / 60, 2),
            "avg_processing_s": round(recent.avg_processing_s, 2) if recent.completed else None,
            "error_rate": round(recent.error_rate, 4),
            "retry_rate": round(recent.retry_rate, 4),
        },
        "series": figures.hour_series(now),
    }


def alerts_state() -> dict:
    alerts = Alert.objects.select_related("rule")
    firing = alerts.filter(state=Alert.State.FIRING)
    return {
        "firing": firing.count(),
        "recent": [
            {
                "id": alert.pk,
                "rule": alert.rule.name,
                "state": alert.state,
                "value": alert.value,
                "message": alert.message,
                "fired_at": alert.fired_at.isoformat(),
                "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
            }
            for alert in alerts[:ALERTS_SHOWN]
        ],
    }
