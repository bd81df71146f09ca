"""The executor, one run at a time in this process: real openai-whisper (tiny.en) on real speech.

The real dispatcher places each job (loading, attempt 1, memory reserved); the test then calls
the q2 task function itself, as a worker would. tests/test_e2e_qcluster.py runs the same task
through the real qcluster.
"""

import os
from datetime import timedelta

import pytest
import torch
from django.utils import timezone

from gpus.models import Allocation
from jobs import services
from jobs.models import AudioFile, Job, SchedulerSettings
from jobs.tasks import run_job
from tests.executor_helpers import FOX, WEATHER, WER_BOUND, active_allocations, history, padded, submit
from tests.portal_fixtures import cpu_device  # noqa: F401
from tests.wer import wer

pytestmark = pytest.mark.django_db(transaction=True)



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
