"""The executor: real openai-whisper (tiny.en) on real espeak-ng speech, through the real qcluster.

Tests about the queue (a job from submission to completion, cancel, a killed worker, a task
delivered twice) run a `manage.py qcluster` subprocess on the test database. Tests about one
run's inner steps (progress, an undecodable file, out of memory, timeout) call the q2 task
function in this process, after the real dispatcher placed the job.
"""

import os
import re
import signal
import subprocess
import time
from datetime import timedelta

import pytest
import torch
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone
from django_q.models import Task
from django_q.tasks import async_task

from gpus.models import Allocation, Device, Node
from jobs import dispatch, executor, services
from jobs.models import AudioFile, Job, JobEvent, SchedulerSettings
from jobs.tasks import run_job
from tests.wer import wer

pytestmark = pytest.mark.django_db(transaction=True)

FOX = "The quick brown fox jumps over the lazy dog."
WEATHER = "It is going to rain tomorrow afternoon."
WER_BOUND = 0.35
DECODE = {"beam_size": 5, "temperature": 0.0}  # greedy tiny.en is badly wrong on synthetic speech


@pytest.fixture
def cpu_device(transactional_db, settings):
    """This machine as one CPU device with 8 GiB for WhisperHub (no GPU agent runs in these tests)."""
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
    """The qcluster, started once the model and device rows exist: its workers preload tiny.en."""
    tiny_model.preload = True
    tiny_model.save(update_fields=["preload"])
    return request.getfixturevalue("qcluster")


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


# --- Through the real qcluster ---------------------------------------------------------------------


def test_speech_job_runs_from_pending_to_completed(cluster, alice, tiny_model, speak):
    job = submit(alice, speak(FOX))

    wait_for(lambda: job_state(job.id) in Job.FINAL_STATES, what="the job to finish", cluster=cluster)

    job.refresh_from_db()
    assert job.state == Job.State.COMPLETED, job.error
    assert history(job.id) == [("", "pending"), ("pending", "loading"), ("loading", "processing"), ("processing", "completed")]
    audio = job.files.get()
    assert wer(FOX, audio.text) <= WER_BOUND, audio.text
    assert audio.state == AudioFile.State.COMPLETED and audio.language == "en"
    assert audio.result["segments"] and audio.result["duration"] == pytest.approx(audio.duration_s, abs=0.1)
    assert job.progress == 1.0 and job.load_seconds is not None and job.transcribe_seconds > 0
    assert active_allocations(job.id) == 0
    # tiny.en is marked preload: the workers loaded it at start and the job found it in the cache.
    assert "preloaded tiny.en on cpu" in cluster.output()
    assert f"job {job.id} attempt 1: model tiny.en on cpu from cache" in cluster.output()


def test_cancel_while_processing_stops_the_worker_and_frees_the_memory(cluster, alice, speak):
    job = submit(alice, padded(speak(FOX), 60))
    in_file = AudioFile.objects.filter(job=job, state=AudioFile.State.PROCESSING)
    wait_for(in_file.exists, what="the file to start", cluster=cluster)

    services.job_cancel(job=job)

    assert active_allocations(job.id) == 0
    stopped = wait_for(
        lambda: re.search(rf"job {job.id} attempt 1: fenced out .* while transcribing file \d+ at (\d+)%", cluster.output()),
        what="the worker to stop", cluster=cluster,
    )
    assert int(stopped[1]) < 100  # stopped inside the file, not after transcribing all of it
    audio = job.files.get()
    assert audio.result is None and audio.state != AudioFile.State.COMPLETED
    assert job_state(job.id) == Job.State.CANCELLED
    # The worker is free again: the next job runs.
    second = submit(alice, speak(WEATHER))
    wait_for(lambda: job_state(second.id) == Job.State.COMPLETED, what="the next job", cluster=cluster)


def test_killed_worker_job_completes_exactly_once(cluster, alice, speak):
    SchedulerSettings.objects.filter(pk=1).update(lease_s=3, heartbeat_s=1)
    job = submit(alice, speak(f"{FOX} {WEATHER}"))
    wait_for(lambda: job_state(job.id) == Job.State.PROCESSING, what="processing", cluster=cluster)

    os.kill(cluster.job_worker_pid(job.id), signal.SIGKILL)

    # No agent runs here: sweep as its loop would, until the lapsed lease is reaped and the
    # job re-queued (after its retry backoff) and run again by the reincarnated worker.
    def finished():
        dispatch.sweep()
        return job_state(job.id) in Job.FINAL_STATES

    wait_for(finished, timeout=120, what="the job to finish after the kill", cluster=cluster, every=0.5)
    job.refresh_from_db()
    assert job.state == Job.State.COMPLETED, job.error
    assert job.attempt == 2 and job.failures == 1
    assert history(job.id).count(("processing", "completed")) == 1
    assert wer(f"{FOX} {WEATHER}", job.files.get().text) <= WER_BOUND
    assert active_allocations(job.id) == 0
    assert list(Allocation.objects.filter(job=job).order_by("id").values_list("attempt", "release_reason")) == [
        (1, "lease expired"),
        (2, "completed"),
    ]


def test_a_task_delivered_twice_runs_once(cluster, alice, speak):
    job = submit(alice, speak(FOX))
    # The dispatcher enqueued it once; q2 redelivering it is another copy of the same task.
    async_task("jobs.tasks.run_job", job.id, 1, cluster=settings.WHISPERHUB_CLUSTER_NAME, task_name=f"job-{job.id}-1-again")

    wait_for(lambda: Task.objects.filter(func="jobs.tasks.run_job").count() == 2, what="both copies", cluster=cluster)
    assert sorted(Task.objects.values_list("result", flat=True)) in (["completed", "duplicate"], ["completed", "stale"])
    assert job_state(job.id) == Job.State.COMPLETED
    assert history(job.id).count(("loading", "processing")) == 1
    assert run_job(job.id, 1) == "stale"  # and once more, long after


# --- One run, in this process --------------------------------------------------------------------


@pytest.fixture
def placed(tiny_model, cpu_device):
    """Submit a job and let the real dispatcher place it (loading, attempt 1); no cluster consumes it."""

    def _placed(user, *paths, **options) -> Job:
        job = submit(user, *paths, **options)
        job.refresh_from_db()
        assert job.state == Job.State.LOADING and job.attempt == 1
        return job

    return _placed


def test_two_files_report_progress_per_file_and_results_as_they_finish(placed, alice, speak, monkeypatch):
    long_clip, short_clip = padded(speak(FOX), 45), speak(WEATHER)
    job = placed(alice, long_clip, short_clip)
    first, second = job.files.order_by("position")
    calls = []

    def recorded(name):
        real = getattr(services, name)

        def call(**kwargs):  # record, then run the real service: the rows below are what it wrote
            calls.append((name, kwargs["file_id"], kwargs.get("file_progress")))
            return real(**kwargs)

        return call

    for name in ("job_report_progress", "job_file_completed"):
        monkeypatch.setattr(services, name, recorded(name))

    assert run_job(job.id, 1) == "completed"

    assert calls[0] == ("job_report_progress", first.id, 0.0)
    inside = [p for name, f, p in calls if name == "job_report_progress" and f == first.id and 0 < p < 1]
    assert inside, calls  # progress within the 45 s file, from whisper's 30 s windows
    done_first = calls.index(("job_file_completed", first.id, None))
    assert calls.index(("job_report_progress", second.id, 0.0)) > done_first  # saved before the next file starts
    first.refresh_from_db()
    second.refresh_from_db()
    assert wer(FOX, first.text) <= WER_BOUND and wer(WEATHER, second.text) <= WER_BOUND
    assert first.transcribe_seconds > 0 and second.transcribe_seconds > 0


def test_an_undecodable_file_fails_alone(placed, alice, speak):
    job = placed(alice, speak(FOX), speak(WEATHER))
    good, bad = job.files.order_by("position")
    # job_create refuses non-audio (ffprobe), so the file goes bad in storage after submission.
    with open(bad.file.path, "wb") as fh:
        fh.write(os.urandom(4096))

    assert run_job(job.id, 1) == "completed"

    job.refresh_from_db()
    good.refresh_from_db()
    bad.refresh_from_db()
    assert job.state == Job.State.COMPLETED
    assert good.state == AudioFile.State.COMPLETED and wer(FOX, good.text) <= WER_BOUND
    assert bad.state == AudioFile.State.FAILED and bad.error.startswith("Could not decode the audio file")
    assert bad.original_name in job.error and job.failures == 0  # no retry for a bad file


@pytest.mark.parametrize(
    "error",
    [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), RuntimeError("CUDA out of memory.")],
    ids=["OutOfMemoryError", "RuntimeError"],
)
def test_out_of_memory_requeues_with_a_larger_reservation(placed, alice, speak, monkeypatch, error):
    job = placed(alice, speak(FOX))
    reserved = job.memory_mb

    def run_out_of_memory(self, *args, **kwargs):
        raise error

    monkeypatch.setattr("whisper.model.Whisper.transcribe", run_out_of_memory)
    assert run_job(job.id, 1) == "failed"

    job.refresh_from_db()
    assert job.oom_retries == 1 and job.failures == 0 and "Out of device memory" in job.error
    assert job.memory_mb > reserved
    # Re-queued without backoff, and placed again at once with the larger reservation.
    assert job.state == Job.State.LOADING and job.attempt == 2
    allocations = Allocation.objects.filter(job=job).order_by("id")
    assert [(a.attempt, a.mb, a.active) for a in allocations] == [(1, reserved, False), (2, job.memory_mb, True)]


def test_other_errors_count_as_a_failed_attempt(placed, alice, speak, tiny_model):
    job = placed(alice, speak(FOX))
    tiny_model.checkpoint = str(tiny_model.checkpoint_path) + ".missing"
    tiny_model.save(update_fields=["checkpoint"])

    assert run_job(job.id, 1) == "failed"

    job.refresh_from_db()
    assert job.state == Job.State.PENDING and job.failures == 1 and "not installed" in job.error
    assert active_allocations(job.id) == 0


def test_a_job_past_its_timeout_stops_and_fails(placed, alice, speak):
    job = placed(alice, speak(FOX))
    Job.objects.filter(id=job.id).update(started_at=timezone.now() - timedelta(seconds=SchedulerSettings.load().task_timeout_s + 1))

    assert run_job(job.id, 1) == "timed out"

    job.refresh_from_db()
    assert job.state == Job.State.FAILED and job.error.startswith("Timed out")
    assert job.files.get().result is None and active_allocations(job.id) == 0


def test_a_stale_or_cancelled_task_does_nothing(placed, alice, speak):
    job = placed(alice, speak(FOX))
    services.job_cancel(job=job)
    events = history(job.id)

    assert run_job(job.id, 1) == "stale"
    assert run_job(job.id, 7) == "stale"
    assert history(job.id) == events and job.files.get().result is None
