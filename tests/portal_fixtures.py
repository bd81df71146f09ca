"""Fixtures shared by the portal, API and OpenAI-endpoint tests: a device, a ready cluster, Daphne.

Imported by those test modules (`from tests.portal_fixtures import cluster  # noqa: F401`).
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone

from gpus.models import Device, Node
from tests.conftest import channel_prefix
from whisperhub.env import database_url

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.fixture
def daphne(transactional_db, settings, tmp_path):
    """Daphne serving whisperhub.asgi on this test's database, as `make run` does; yields its URL.

    pytest-django's live_server is WSGI: it cannot show how a view behaves under the ASGI server.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        DATABASE_URL=database_url(connection.settings_dict),
        REDIS_URL=settings.REDIS_URL,
        WHISPERHUB_CHANNEL_PREFIX=channel_prefix(settings),
        MEDIA_ROOT=str(settings.MEDIA_ROOT),
        WHISPERHUB_NODE_OFFLINE_AFTER="3600",
        PYTHONUNBUFFERED="1",
    )
    log_path = tmp_path / "daphne.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "whisperhub.asgi:application"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/accounts/login/", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"daphne did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _other_sessions_wait_gone()


def _other_sessions_wait_gone(timeout_s: float = 10) -> None:
    # PostgreSQL ends a dead client's backend a moment after it exits; until then the test
    # database cannot be flushed or dropped.
    deadline = time.monotonic() + timeout_s
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
            if cursor.fetchone()[0] == 0:
                return
            time.sleep(0.1)
