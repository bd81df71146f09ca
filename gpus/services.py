"""The reservation ledger: the only code that grants or frees device memory.

Locking policy (docs/LEDGER.md has the long form):
- Every grant and every release is one short transaction that first locks the device rows it
  touches with SELECT … FOR UPDATE, always in ascending id order, and only then reads or writes
  allocation rows. One order for everyone means two transactions can never wait on each other
  in a cycle, whichever devices they name.
- Inside the lock: one aggregate query over the active allocation rows, the decision, one
  INSERT or guarded UPDATE. No I/O, no event publishing; events go out after commit.
- The allocated figure is always derived from the rows (sum of active allocations), never a
  stored counter, so a crashed worker can't leave it drifting: its row is reaped when its lease lapses.
"""

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import IntegrityError, transaction
from django.db.models import Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from gpus.models import Allocation, Device
from whisperhub import live


class LedgerError(Exception):
    pass


class InsufficientMemory(LedgerError):
    pass


class DeviceUnavailable(LedgerError):
    pass


class AllocationExists(LedgerError):
    """The job already holds an active allocation (one per job, guarded by a unique index)."""


@dataclass(frozen=True)
class MemoryFigures:
    device_id: int
    total_mb: int
    reserved_mb: int
    allocatable_mb: int
    allocated_mb: int
    foreign_used_mb: int
    available_mb: int
    usage_percent: float


def allocatable_mb(*, total_mb: int, reserved_mb: int, safety_factor: float, foreign_used_mb: int) -> int:
    """(total − reserved) × safety − foreign use, in whole MiB, never below 0.

    Rounded to 6 places before the floor so that e.g. 100 × 0.29 = 28.999999999999996 counts as 29.
    """
    share = math.floor(round((total_mb - reserved_mb) * safety_factor, 6))
    return max(0, share - foreign_used_mb)


def _figures(device: Device, allocated: int) -> MemoryFigures:
    allocatable = allocatable_mb(
        total_mb=device.total_mb,
        reserved_mb=device.reserved_mb,
        safety_factor=device.safety_factor,
        foreign_used_mb=device.foreign_used_mb,
    )
    if allocatable > 0:
        usage = round(allocated / allocatable * 100, 1)
    else:
        usage = 0.0  # the seed's convention: nothing can be handed out, so nothing is "used"
    return MemoryFigures(
        device_id=device.id,
        total_mb=device.total_mb,
        reserved_mb=device.reserved_mb,
        allocatable_mb=allocatable,
        allocated_mb=allocated,
        foreign_used_mb=device.foreign_used_mb,
        available_mb=max(0, allocatable - allocated),
        usage_percent=usage,
    )


def _active_sum():
    return Coalesce(Sum("allocations__mb", filter=Q(allocations__released_at__isnull=True)), 0)


def devices_with_allocated(device_ids=None):
    """Devices (with node) annotated with `allocated_mb`: one query. Shared by the API and admin."""
    devices = Device.objects.select_related("node").annotate(allocated_mb=_active_sum())
    if device_ids is not None:
        devices = devices.filter(id__in=device_ids)
    return devices


def device_figures(device: Device) -> MemoryFigures:
    """Figures of a device fetched through devices_with_allocated()."""
    return _figures(device, device.allocated_mb)


def memory_figures(device_ids=None) -> dict[int, MemoryFigures]:
    """Ledger figures per device id, in one query. A snapshot: it takes no lock."""
    return {device.id: device_figures(device) for device in devices_with_allocated(device_ids)}


def device_grantable(device: Device) -> bool:
    return device.enabled and not device.draining and device.node.online




def _lock_devices(device_ids) -> dict[int, Device]:
    """Lock the device rows in id order (the one global lock order) and return them by id."""
    locked = (
        Device.objects.select_for_update(of=("self",))
        .select_related("node")
        .filter(id__in=device_ids)
        .order_by("id")
    )
    return {device.id: device for device in locked}


def _allocated_by_device(device_ids) -> dict[int, int]:
    rows = (
        Allocation.objects.filter(device_id__in=device_ids, released_at__isnull=True)
        .values("device_id")
        .annotate(total=Sum("mb"))
        .values_list("device_id", "total")
    )
    return dict(rows)


def _grant(*, device_ids, mb, job_id, attempt, lease_s, strict) -> Allocation | None:
    """Grant `mb` on the first device (in the given order) where it fits.

    strict (single device): raise why it was refused instead of returning None.
    """
    if mb <= 0:
        raise ValueError(f"a reservation needs a positive amount of memory, not {mb} MiB")
    try:
        with transaction.atomic():
            devices = _lock_devices(device_ids)
            allocated = _allocated_by_device(list(devices))
            for device_id in device_ids:
                device = devices.get(device_id)
                if device is None or not device_grantable(device):
                    if strict:
                        raise DeviceUnavailable(_unavailable_reason(device_id, device))
                    continue
                figures = _figures(device, allocated.get(device_id, 0))
                if figures.available_mb < mb:
                    if strict:
                        raise InsufficientMemory(
                            f"{device} has {figures.available_mb} MiB available, {mb} MiB requested"
                        )
                    continue
                now = timezone.now()
                allocation = Allocation.objects.create(
                    device=device,
                    job_id=job_id,
                    attempt=attempt,
                    mb=mb,
                    created_at=now,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                )
                break
            else:
                return None
    except IntegrityError as exc:
        if _constraint_name(exc) == "allocation_one_active_per_job":
            raise AllocationExists(f"job {job_id} already holds an active allocation") from None
        raise
    live.devices_changed()
    return allocation


def _unavailable_reason(device_id, device) -> str:
    if device is None:
        return f"device {device_id} does not exist"
    if not device.enabled:
        return f"{device} is disabled"
    if device.draining:
        return f"{device} is draining"
    return f"{device}: its node {device.node} is offline"


def _constraint_name(exc: IntegrityError) -> str | None:
    diag = getattr(exc.__cause__, "diag", None)
    return getattr(diag, "constraint_name", None)


def allocation_reserve(*, device_id: int, mb: int, job_id=None, attempt: int = 0, lease_s: float = 60) -> Allocation:
    """Reserve `mb` MiB on one device; raises InsufficientMemory or DeviceUnavailable."""
    return _grant(device_ids=[device_id], mb=mb, job_id=job_id, attempt=attempt, lease_s=lease_s, strict=True)


def allocation_reserve_first_fit(
    *, device_ids: list[int], mb: int, job_id=None, attempt: int = 0, lease_s: float = 60
) -> Allocation | None:
    """Reserve on the first device of `device_ids` (preference order) where `mb` fits; None if none."""
    if not device_ids:
        return None
    return _grant(device_ids=list(device_ids), mb=mb, job_id=job_id, attempt=attempt, lease_s=lease_s, strict=False)


def allocation_release(*, allocation_id: int, reason: str = "") -> bool:
    """Free an allocation. Idempotent: True only for the call that released it."""
    device_id = Allocation.objects.filter(id=allocation_id).values_list("device_id", flat=True).first()
    if device_id is None:
        return False
    with transaction.atomic():
        # The device lock serialises this release with grants on the same device, so each
        # grant decides on a sum that no release is halfway through changing.
        _lock_devices([device_id])
        released = Allocation.objects.filter(id=allocation_id, released_at__isnull=True).update(
            released_at=timezone.now(), release_reason=reason[:200]
        )
    if released:
        live.devices_changed()
    return released == 1


def allocation_renew(*, allocation_id: int, lease_s: float) -> bool:
    """Push the lease forward; False if the allocation was already released (reaped or freed).

    No device lock: the lease date does not enter the sum. The guarded update is the whole race
    argument against the reaper: whichever of the two commits first wins, the other changes nothing.
    """
    renewed = Allocation.objects.filter(id=allocation_id, released_at__isnull=True).update(
        lease_expires_at=timezone.now() + timedelta(seconds=lease_s)
    )
    return renewed == 1


def allocations_reap_expired(*, now: datetime | None = None) -> list[Allocation]:
    """Release every active allocation whose lease lapsed (its worker died or its node vanished)."""
    now = now or timezone.now()
    lapsed = Q(released_at__isnull=True, lease_expires_at__lt=now)
    device_ids = sorted(set(Allocation.objects.filter(lapsed).values_list("device_id", flat=True)))
    if not device_ids:
        return []
    with transaction.atomic():
        _lock_devices(device_ids)
        # Re-read under the locks: a lease renewed meanwhile is no longer lapsed and stays.
        reaped = list(Allocation.objects.filter(lapsed, device_id__in=device_ids).select_for_update())
        released_at = timezone.now()
        Allocation.objects.filter(id__in=[a.id for a in reaped], released_at__isnull=True).update(
            released_at=released_at, release_reason="lease expired"
        )
    for allocation in reaped:
        allocation.released_at = released_at
        allocation.release_reason = "lease expired"
    if reaped:
        live.devices_changed()
    return reaped
