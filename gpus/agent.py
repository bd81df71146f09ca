"""The per-node GPU agent: registers this node's devices, then reports their telemetry.

It also drives the cluster's periodic sweep (jobs.dispatch.sweep: lease reaper and dispatch)
every SchedulerSettings.poll_interval_s, so every node running an agent keeps the queue moving
even when no submission or job end triggers a dispatch.

NVML only, never CUDA: this process must stay free of a CUDA context (see gpus/backends.py).
"""

import importlib
import logging
import threading
import time

from django.conf import settings
from django.db import close_old_connections, transaction
from django.db.models import Max, Q
from django.utils import timezone

from gpus import alerts
from gpus.backends import DeviceBackend, DeviceInfo, backend_from_settings
from gpus.models import Device, Node
from jobs.models import SchedulerSettings
from whisperhub import live

logger = logging.getLogger(__name__)

# Devices that vanished from discovery are parked at indexes from PARKED_INDEX_START on, so that
# their (node, index) slot is free for whatever device sits there now. Indexes from SWAP_INDEX_START
# are only used inside one registration transaction, while devices change places.
PARKED_INDEX_START = 1000
SWAP_INDEX_START = 20000


def device_register_all(*, node: Node, found: list[DeviceInfo]) -> dict[str, int]:
    """Upsert the node's devices by UUID; return {uuid: device id}.

    Staff-edited fields (reserved, safety factor, enabled, draining) are kept. Devices that
    vanished (GPU removed, smaller sim pool) are disabled, not deleted: allocations refer to them.
    """
    by_uuid = {info.uuid: info for info in found}
    with transaction.atomic():
        # This node's devices, plus found ones registered under another node name before.
        rows = {d.uuid: d for d in Device.objects.select_for_update().filter(Q(node=node) | Q(uuid__in=by_uuid))}
        _park(node, [d for d in rows.values() if d.uuid not in by_uuid])
        # Devices changing place step aside first, so swapped indexes never meet on the constraint.
        moving = [d for d in rows.values() if d.uuid in by_uuid and (d.node_id, d.index) != (node.id, by_uuid[d.uuid].index)]
        for offset, device in enumerate(moving):
            device.index = SWAP_INDEX_START + offset
            device.save(update_fields=["index"])
        return {info.uuid: _device_upsert(node, rows.get(info.uuid), info).id for info in found}


def _park(node: Node, vanished: list[Device]) -> None:
    parked = Device.objects.filter(node=node, index__gte=PARKED_INDEX_START, index__lt=SWAP_INDEX_START)
    next_free = max(PARKED_INDEX_START, (parked.aggregate(m=Max("index"))["m"] or 0) + 1)
    for device in vanished:
        changed = []
        if device.enabled:
            logger.warning("device %s (%s) is no longer reported: disabled", device.uuid, device.name)
            device.enabled = False
            changed.append("enabled")
        if device.index < PARKED_INDEX_START:
            device.index, next_free = next_free, next_free + 1
            changed.append("index")
        if changed:
            device.save(update_fields=changed)


def _device_upsert(node: Node, device: Device | None, info: DeviceInfo) -> Device:
    if device is None:
        return Device.objects.create(
            node=node,
            index=info.index,
            uuid=info.uuid,
            name=info.name,
            kind=info.kind,
            total_mb=info.total_mb,
            safety_factor=settings.WHISPERHUB_DEFAULT_SAFETY_FACTOR,
        )
    if device.reserved_mb > info.total_mb:
        # The device shrank (a smaller CPU budget, a changed sim pool): keep the row valid.
        logger.warning("device %s: reserved %d MiB > new total %d MiB, clamped", info.uuid, device.reserved_mb, info.total_mb)
        device.reserved_mb = info.total_mb
    device.node, device.index, device.name, device.kind, device.total_mb = (
        node, info.index, info.name, info.kind, info.total_mb,
    )
    device.save(update_fields=["node", "index", "name", "kind", "total_mb", "reserved_mb"])
    return device


def dispatch_sweep_hook():
    """jobs.dispatch.sweep when that module provides it, else None (looked up by name, so the agent
    runs before and without the scheduler)."""
    try:
        module = importlib.import_module("jobs.dispatch")
    except ModuleNotFoundError as exc:
        if exc.name != "jobs.dispatch":
            raise
        return None
    return getattr(module, "sweep", None)


class Agent:
    """One node's agent. run_once() does whatever is due and says whether it did anything."""

    def __init__(self, *, backend: DeviceBackend | None = None, node_name: str | None = None, interval_s: float | None = None):
        self.backend = backend or backend_from_settings()
        self.node_name = node_name or settings.WHISPERHUB_NODE_NAME
        self.interval_s = settings.WHISPERHUB_AGENT_INTERVAL if interval_s is None else interval_s
        self.node: Node | None = None
        self.device_ids: dict[str, int] = {}
        self.next_report = 0.0
        self.next_sweep = 0.0
        self.stopping = threading.Event()

    def register(self) -> Node:
        now = timezone.now()
        found = self.backend.discover()
        self.node, _ = Node.objects.update_or_create(
            name=self.node_name,
            defaults={
                "cluster_name": settings.WHISPERHUB_CLUSTER_NAME,
                "backend": self.backend.name,
                "started_at": now,
                "last_seen": now,
            },
        )
        self.device_ids = device_register_all(node=self.node, found=found)
        live.devices_changed()
        logger.info("agent: node %s registered with %d device(s) (%s)", self.node_name, len(found), self.backend.name)
        return self.node

    def report(self) -> None:
        """Write every device's telemetry and the node's last_seen, in one short transaction."""
        readings = self.backend.telemetry()  # outside the transaction: NVML calls can be slow
        now = timezone.now()
        devices = [
            Device(
                id=self.device_ids[t.uuid],
                used_mb=t.used_mb,
                foreign_used_mb=t.foreign_used_mb,
                utilization_pct=t.utilization_pct,
                temperature_c=t.temperature_c,
                telemetry_at=now,
            )
            for t in readings
            if t.uuid in self.device_ids
        ]
        with transaction.atomic():
            # Plain UPDATEs take the device row locks, so a grant in flight finishes with the
            # figures it locked before the new foreign use applies.
            Device.objects.bulk_update(
                devices, ["used_mb", "foreign_used_mb", "utilization_pct", "temperature_c", "telemetry_at"]
            )
            Node.objects.filter(pk=self.node.pk).update(last_seen=now)
            live.devices_changed()

    def sweep(self) -> bool:
        hook = dispatch_sweep_hook()
        if hook is None:
            return False
        hook()
        return True

    def run_once(self) -> bool:
        """Report telemetry and sweep, each when due. True if either ran."""
        if self.node is None:
            self.register()
        did = False
        if time.monotonic() >= self.next_report:
            self._guarded("telemetry", self.report)
            # Due once per alerts.EVALUATE_EVERY across all nodes; it never raises, never waits on a webhook.
            self._guarded("alerts", alerts.evaluate_due)
            self.next_report = time.monotonic() + self.interval_s
            did = True
        if time.monotonic() >= self.next_sweep:
            self._guarded("sweep", self.sweep)
            self.next_sweep = time.monotonic() + self._poll_interval_s()
            did = True
        return did

    def _poll_interval_s(self) -> float:
        try:
            return SchedulerSettings.load().poll_interval_s
        except Exception:  # noqa: BLE001 - database away: retry at the agent's own pace
            logger.warning("agent: scheduler settings unreadable", exc_info=True)
            return self.interval_s

    def _guarded(self, what: str, step) -> None:
        # A PostgreSQL restart or a transient NVML error costs one cycle, never the agent.
        try:
            step()
        except Exception:  # noqa: BLE001
            logger.exception("agent: %s failed", what)

    def run(self) -> None:
        """Loop until stop() (SIGTERM)."""
        self.register()
        try:
            while not self.stopping.is_set():
                # Drops a connection a PostgreSQL restart broke, as Django does between requests.
                close_old_connections()
                self.run_once()
                wait = min(self.next_report, self.next_sweep) - time.monotonic()
                self.stopping.wait(max(0.0, wait))
        finally:
            self.backend.close()

    def stop(self, *args) -> None:
        self.stopping.set()
