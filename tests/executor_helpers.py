"""Helpers shared by the executor tests (in-process and through the real qcluster)."""

import subprocess
import time

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from gpus.models import Allocation
from jobs import services
from jobs.models import Job, JobEvent

FOX = "The quick brown fox jumps over the lazy dog."
WEATHER = "It is going to rain tomorrow afternoon."
WER_BOUND = 0.35
DECODE = {"beam_size": 5, "temperature": 0.0}  # greedy tiny.en is badly wrong on synthetic speech


def upload(path, name=None) -> SimpleUploadedFile:
    return SimpleUploadedFile(name or path.name, path.read_bytes(), content_type="audio/wav")


def padded(path, seconds: float):
    """The clip followed by silence up to `seconds`: several 30 s Whisper windows, little speech."""
    out = path.with_name(f"{path.stem}-{int(seconds)}s.wav")
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-i", str(path), "-af", f"apad=whole_dur={seconds}", str(out)], check=True
    )
    return out


def submit(user, *paths, **options) -> Job:
    return services.job_create(user=user, files=[upload(p) for p in paths], model_name="tiny.en", **{**DECODE, **options})


def wait_for(predicate, timeout: float = 60, what: str = "condition", cluster=None, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    log = cluster.output()[-4000:] if cluster else ""
    pytest.fail(f"timed out waiting for {what}\n{log}")


def job_state(job_id: int) -> str:
    return Job.objects.values_list("state", flat=True).get(id=job_id)


def active_allocations(job_id: int) -> int:
    return Allocation.objects.filter(job_id=job_id, released_at__isnull=True).count()


def history(job_id: int) -> list[tuple[str, str]]:
    return list(JobEvent.objects.filter(job_id=job_id).values_list("from_state", "to_state"))
