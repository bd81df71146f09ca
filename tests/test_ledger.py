"""The reservation ledger: formula, grants, refusals, releases, leases, and concurrency."""

from datetime import timedelta

import pytest
from django.utils import timezone

from gpus import services
from gpus.models import Allocation, Device, Node
from gpus.services import DeviceUnavailable, InsufficientMemory


def make_node(name="node-a", *, online=True) -> Node:
    last_seen = timezone.now() if online else timezone.now() - timedelta(days=1)
    return Node.objects.create(name=name, cluster_name=f"whisperhub-{name}", backend="sim", last_seen=last_seen)


def make_device(node, index=0, *, total_mb=10_000, reserved_mb=0, safety_factor=0.8, **extra) -> Device:
    return Device.objects.create(
        node=node,
        index=index,
        uuid=f"SIM-{node.name}-{index}",
        name=f"Simulated {index}",
        kind=Device.Kind.SIMULATED,
        total_mb=total_mb,
        reserved_mb=reserved_mb,
        safety_factor=safety_factor,
        **extra,
    )


@pytest.fixture
def node(db):
    return make_node()


@pytest.fixture
def device(node):
    return make_device(node)


def test_formula_matches_the_seed(node):
    device = make_device(node, total_mb=24576, reserved_mb=2048, safety_factor=0.8)
    services.allocation_reserve(device_id=device.id, mb=3000)
    services.allocation_reserve(device_id=device.id, mb=1000)

    figures = services.memory_figures()[device.id]

    assert figures.allocatable_mb == 18022  # floor((24576 − 2048) × 0.8) = floor(18022.4)
    assert figures.allocated_mb == 4000
    assert figures.available_mb == 14022
    assert figures.usage_percent == round(4000 / 18022 * 100, 1)


def test_a_reservation_that_does_not_fit_is_refused_and_writes_nothing(device):
    with pytest.raises(InsufficientMemory, match="8000 MiB available, 8001 MiB requested"):
        services.allocation_reserve(device_id=device.id, mb=8001)
    assert not Allocation.objects.exists()


def test_release_twice_releases_once(device):
    allocation = services.allocation_reserve(device_id=device.id, mb=100)

    assert services.allocation_release(allocation_id=allocation.id, reason="done") is True
    assert services.allocation_release(allocation_id=allocation.id, reason="again") is False

    allocation.refresh_from_db()
    assert allocation.release_reason == "done"
    assert services.memory_figures()[device.id].allocated_mb == 0


@pytest.mark.parametrize(
    "change, reason",
    [({"enabled": False}, "disabled"), ({"draining": True}, "draining")],
)
def test_disabled_and_draining_devices_are_refused(device, change, reason):
    Device.objects.filter(id=device.id).update(**change)
    with pytest.raises(DeviceUnavailable, match=reason):
        services.allocation_reserve(device_id=device.id, mb=100)
    assert not Allocation.objects.exists()


def test_offline_node_is_refused(db):
    device = make_device(make_node("gone", online=False))
    with pytest.raises(DeviceUnavailable, match="offline"):
        services.allocation_reserve(device_id=device.id, mb=100)
