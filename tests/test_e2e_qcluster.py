"""Jobs through the real django-q2 cluster: real openai-whisper (tiny.en) on real espeak-ng speech.

Each test runs a `manage.py qcluster` subprocess (2 workers) on the test database; rows are
committed (transactional tests) so the cluster sees them. No GPU agent runs: the device is a
CPU row, and where recovery is tested the test sweeps as the agent's loop would.
"""

import os
import re
import signal

import pytest
from django.conf import settings
from django_q.models import Task
from django_q.tasks import async_task

from gpus.models import Allocation
from jobs import dispatch, services
from jobs.models import AudioFile, Job, SchedulerSettings
from jobs.tasks import run_job
from tests.executor_helpers import (
    FOX,
    WEATHER,
    WER_BOUND,
    active_allocations,
    history,
    job_state,
    padded,
    submit,
    wait_for,
)
from tests.portal_fixtures import cluster, cpu_device  # noqa: F401
from tests.wer import wer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.qcluster]



def test_api_submission_to_subtitles(cluster, alice_api, speak):
    """What an API client does: upload, poll, download subtitles with word timings."""
    with open(speak(FOX), "rb") as fh:
        response = alice_api.post(
            "/api/jobs/",
            {"files": [fh], "model": "tiny.en", "beam_size": 5, "word_timestamps": True},
            format="multipart",
        )
    assert response.status_code == 201, response.json()
    job_id, file_id = response.json()["id"], response.json()["files"][0]["id"]

    wait_for(lambda: alice_api.get(f"/api/jobs/{job_id}/").json()["state"] in Job.FINAL_STATES, what="the job", cluster=cluster)

    detail = alice_api.get(f"/api/jobs/{job_id}/").json()
    assert detail["state"] == "completed" and detail["progress"] == 100.0  # the API speaks percent
    srt = alice_api.get(f"/api/jobs/{job_id}/files/{file_id}/download?format=srt")
    assert srt.status_code == 200 and "00:00:00,000 --> " in srt.content.decode()
    words = [w for segment in AudioFile.objects.get(id=file_id).result["segments"] for w in segment["words"]]
    assert wer(FOX, " ".join(w["word"] for w in words)) <= WER_BOUND
    assert all(0 <= w["start"] <= w["end"] for w in words)


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
    SchedulerSettings.objects.update_or_create(pk=1, defaults={"lease_s": 3, "heartbeat_s": 1})
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
