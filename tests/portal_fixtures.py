"""Fixtures shared by the portal, API and OpenAI-endpoint tests: a device and a ready cluster.

Imported by those test modules (`from tests.portal_fixtures import cluster  # noqa: F401`).
"""

import pytest
from django.utils import timezone

from gpus.models import Device, Node


@pytest.fixture
def cpu_device(transactional_db, settings):
    """This machine as one CPU device with 8 GiB for WhisperHub (no GPU agent runs in tests)."""
    settings.WHISPERHUB_NODE_OFFLINE_AFTER = 3600.0
    node = Node.objects.create(
        name=settings.WHISPERHUB_NODE_NAME,
        cluster_name=settings.WHISPERHUB_CLUSTER_NAME,
        backend="cpu",
        started_at=timezone.now(),
        last_seen=timezone.now(),
    )
    return Device.objects.create(node=node, index=0, uuid="cpu-test", name="CPU", kind=Device.Kind.CPU, total_mb=8192)


@pytest.fixture
def cluster(transactional_db, tiny_model, cpu_device, request):
    """The real qcluster, started once the model and device rows exist, its workers preloading tiny.en."""
    tiny_model.preload = True
    tiny_model.save(update_fields=["preload"])
    return request.getfixturevalue("qcluster")
