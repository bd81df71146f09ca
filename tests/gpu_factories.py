"""Nodes and devices for the ledger, agent, API and admin tests."""

from datetime import timedelta

from django.utils import timezone

from gpus.models import Device, Node


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
