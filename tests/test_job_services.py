"""Job services: submission checks, the transitions a task reports, fencing, retries, recovery."""

from datetime import timedelta

import pytest
from django.http import Http404
from django.utils import timezone

from gpus.models import Allocation
from gpus.services import memory_figures
from jobs import services
from jobs.dispatch import dispatch_pending
from jobs.models import AudioFile, Job, JobEvent, SchedulerSettings, WhisperModel
from jobs.selectors import job_get_for_user, pending_queue
from jobs.services import JobInputError, JobStateError
from tests.scheduling import install_model, make_device, make_job, make_node, scheduler, upload

pytestmark = pytest.mark.django_db

State = Job.State


@pytest.fixture
def model(tmp_path):
    checkpoint = tmp_path / "tiny.en.pt"
    checkpoint.write_bytes(b"weights")
    return install_model(checkpoint, memory_mb=1000)


@pytest.fixture
def device(db):
    return make_device(make_node(), total_mb=10_000)


def media_files(settings) -> list:
    return [p for p in settings.MEDIA_ROOT.rglob("*") if p.is_file()] if settings.MEDIA_ROOT.exists() else []


def active_allocations(job) -> list:
    return list(Allocation.objects.filter(job=job, released_at__isnull=True))


def placed(job) -> Job:
    """Dispatch and return the job as it now is (loading with a new attempt, if it fit)."""
    dispatch_pending()
    job.refresh_from_db()
    return job


def processing(job) -> Job:
    job = placed(job)
    assert services.job_start_processing(job_id=job.id, attempt=job.attempt, load_seconds=0.2)
    job.refresh_from_db()
    return job


# --- Submission ---


def test_a_submission_stores_the_audio_and_reserves_model_need_times_multiplier(alice, model, device, settings):
    job = services.job_create(user=alice, files=[upload("talk.wav")], model_name="tiny.en", priority="high")

    assert job.state == State.PENDING
    assert job.memory_mb == 1500  # 1000 MiB × inference multiplier 1.5
    audio = job.files.get()
    assert audio.original_name == "talk.wav"
    assert audio.duration_s == pytest.approx(0.5, abs=0.01)
    assert audio.file.name.startswith(f"audio/{job.id}/") and "talk" not in audio.file.name
    assert media_files(settings) == [settings.MEDIA_ROOT / audio.file.name]
    assert [e.to_state for e in job.events.all()] == [State.PENDING]


def test_a_submission_is_placed_as_soon_as_it_commits(alice, model, device, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        job = services.job_create(user=alice, files=[upload()], model_name="tiny.en")

    job.refresh_from_db()
    assert job.state == State.LOADING and job.attempt == 1 and job.device == device
    assert active_allocations(job)[0].mb == 1500


def test_with_no_device_registered_yet_a_large_job_is_accepted_and_waits(alice, model):
    model.memory_mb = 500_000
    model.save()

    job = services.job_create(user=alice, files=[upload()], model_name="tiny.en")

    assert job.state == State.PENDING


@pytest.mark.parametrize(
    "change, field, message",
    [
        (dict(model_name="nope"), "model", 'Unknown model "nope"'),
        (dict(model_name="disabled"), "model", "Unknown model"),
        (dict(model_name="absent"), "model", "not installed"),
        (dict(files=[]), "files", "at least one"),
        (dict(files=[upload("a.wav"), upload("b.wav"), upload("c.wav")]), "files", "at most 2"),
        (dict(files=[upload("a.wav"), upload("empty.wav", b"")]), "files", "empty.wav: the file is empty"),
        (dict(files=[upload("a.wav"), upload("notes.wav", b"just some text\n" * 50)]), "files", "notes.wav: Not a readable audio"),
        (dict(files=[upload("big.wav", b"\0" * (1024 * 1024 + 1))]), "files", "larger than the 1 MB limit"),
        (dict(task="translate"), "task", "English-only"),
        (dict(language="klingon"), "language", "Unknown language"),
        (dict(language="de"), "language", "English only"),
        (dict(priority="urgent"), "priority", "one of"),
        (dict(output_formats=["docx"]), "output_formats", "docx"),
        (dict(callback_url="ftp://example.com/x"), "callback_url", "http"),
        (dict(model_name="huge"), "model", "more than any device here can give (largest: 10000 MiB)"),
    ],
)
def test_a_bad_submission_is_refused_and_leaves_nothing_behind(alice, model, device, settings, tmp_path, change, field, message):
    settings.MAX_FILES_PER_JOB = 2
    settings.MAX_UPLOAD_MB = 1
    install_model(tmp_path / "tiny.en.pt", name="disabled", enabled=False)
    install_model(tmp_path / "missing.pt", name="absent")
    install_model(tmp_path / "tiny.en.pt", name="huge", memory_mb=7000, english_only=False)
    arguments = dict(user=alice, files=[upload()], model_name="tiny.en") | change

    with pytest.raises(JobInputError) as caught:
        services.job_create(**arguments)

    assert caught.value.field == field
    assert message in caught.value.message
    assert not Job.objects.exists() and not AudioFile.objects.exists()
    assert media_files(settings) == []


def test_a_client_path_in_the_file_name_is_kept_for_display_only(alice, model, device, settings):
    job = services.job_create(user=alice, files=[upload("../../etc/passwd.wav")], model_name="tiny.en")

    audio = job.files.get()
    assert audio.original_name == "passwd.wav"
    assert (settings.MEDIA_ROOT / audio.file.name).resolve().is_relative_to(settings.MEDIA_ROOT.resolve())


# --- The transitions a running task reports ---


def test_a_job_runs_through_its_states_and_frees_its_memory(alice, device):
    job = processing(make_job(alice, durations=(10.0, 30.0)))
    first, second = job.files.all()

    assert services.job_report_progress(job_id=job.id, attempt=1, file_id=first.id, file_progress=0.5)
    assert Job.objects.get(id=job.id).progress == pytest.approx(5 / 40)
    result = {"text": " Hello there. ", "language": "en", "segments": [{"start": 0.0, "end": 1.0, "text": "Hello there."}]}
    assert services.job_file_completed(job_id=job.id, attempt=1, file_id=first.id, result=result, seconds=1.5)
    assert services.job_report_progress(job_id=job.id, attempt=1, file_id=second.id, file_progress=0.5)
    assert Job.objects.get(id=job.id).progress == pytest.approx((10 + 15) / 40)
    assert services.job_file_completed(job_id=job.id, attempt=1, file_id=second.id, result={"text": "Bye"}, seconds=2)
    assert services.job_complete(job_id=job.id, attempt=1, transcribe_seconds=3.5)

    job.refresh_from_db()
    first.refresh_from_db()
    assert job.state == State.COMPLETED and job.progress == 1 and job.error == ""
    assert job.load_seconds == 0.2 and job.transcribe_seconds == 3.5 and job.finished_at is not None
    assert (first.text, first.language, first.state) == ("Hello there.", "en", AudioFile.State.COMPLETED)
    assert first.result["segments"][0]["end"] == 1.0
    assert active_allocations(job) == []
    assert memory_figures()[device.id].allocated_mb == 0
    assert [e.to_state for e in job.events.all()] == [State.LOADING, State.PROCESSING, State.COMPLETED]


def test_an_undecodable_file_fails_alone_and_the_job_completes_with_a_note(alice, device):
    job = processing(make_job(alice, durations=(10.0, 10.0)))
    bad, good = job.files.all()

    assert services.job_file_failed(job_id=job.id, attempt=1, file_id=bad.id, error="Invalid data found")
    services.job_file_completed(job_id=job.id, attempt=1, file_id=good.id, result={"text": "ok"}, seconds=1)
    services.job_complete(job_id=job.id, attempt=1, transcribe_seconds=1)

    job.refresh_from_db()
    assert job.state == State.COMPLETED
    assert job.error == "1 of 2 files failed; clip0.wav: Invalid data found"


def test_a_job_whose_every_file_failed_is_failed_with_the_reason(alice, device):
    job = processing(make_job(alice))
    services.job_file_failed(job_id=job.id, attempt=1, file_id=job.files.get().id, error="Invalid data found")
    services.job_complete(job_id=job.id, attempt=1, transcribe_seconds=0.1)

    job.refresh_from_db()
    assert job.state == State.FAILED
    assert "clip0.wav: Invalid data found" in job.error
    assert active_allocations(job) == []


def test_a_stale_attempt_is_fenced_out_and_changes_nothing(alice, device):
    job = processing(make_job(alice))
    services.job_attempt_failed(job_id=job.id, attempt=1, error="worker crashed")
    Job.objects.filter(id=job.id).update(not_before=None)
    job = processing(job)
    assert job.attempt == 2
    audio = job.files.get()
    before = Job.objects.filter(id=job.id).values().get()
    events = job.events.count()

    assert services.job_start_processing(job_id=job.id, attempt=1, load_seconds=9) is False
    assert services.job_report_progress(job_id=job.id, attempt=1, file_id=audio.id, file_progress=0.9) is False
    assert services.job_file_completed(job_id=job.id, attempt=1, file_id=audio.id, result={"text": "x"}, seconds=1) is False
    assert services.job_file_failed(job_id=job.id, attempt=1, file_id=audio.id, error="x") is False
    assert services.job_heartbeat(job_id=job.id, attempt=1) is False
    assert services.job_complete(job_id=job.id, attempt=1, transcribe_seconds=1) is False
    assert services.job_attempt_failed(job_id=job.id, attempt=1, error="late").state == State.PROCESSING

    assert Job.objects.filter(id=job.id).values().get() == before
    assert job.events.count() == events
    audio.refresh_from_db()
    assert (audio.state, audio.progress, audio.text) == (AudioFile.State.PENDING, 0.0, "")
    assert len(active_allocations(job)) == 1


def test_heartbeat_renews_the_lease_of_the_running_attempt(alice, device):
    job = placed(make_job(alice))
    Allocation.objects.filter(job=job).update(lease_expires_at=timezone.now() + timedelta(seconds=1))

    assert services.job_heartbeat(job_id=job.id, attempt=1)

    lease_s = SchedulerSettings.load().lease_s
    assert active_allocations(job)[0].lease_expires_at > timezone.now() + timedelta(seconds=lease_s - 5)


# --- Failures, retries, out of memory, timeout ---


def test_failed_attempts_retry_with_backoff_then_the_job_fails(alice, device):
    scheduler(max_retries=2)
    job = make_job(alice)
    for attempt in (1, 2):
        job = processing(job)
        job = services.job_attempt_failed(job_id=job.id, attempt=attempt, error="decoder exploded")
        assert job.state == State.PENDING and job.failures == attempt
        assert job.not_before > timezone.now() and active_allocations(job) == []
        assert placed(job).state == State.PENDING  # backing off
        dispatch_pending(now=job.not_before + timedelta(seconds=1))
        job.refresh_from_db()

    job = services.job_attempt_failed(job_id=job.id, attempt=3, error="decoder exploded")

    assert job.state == State.FAILED
    assert job.error == "Failed after 3 attempt(s): decoder exploded"
    assert active_allocations(job) == []


def test_out_of_memory_raises_the_estimate_and_requeues_outside_the_retry_budget(alice, device):
    scheduler(max_retries=0)
    model = WhisperModel.objects.get(name="tiny.en")
    job = processing(make_job(alice, memory_mb=1500))
    waiting = make_job(alice, memory_mb=1500, priority=Job.Priority.LOW)

    job = services.job_attempt_failed(job_id=job.id, attempt=1, error="CUDA out of memory", oom=True)

    assert job.state == State.PENDING and job.failures == 0 and job.oom_retries == 1
    assert job.memory_mb == 2250 and job.not_before is None
    model.refresh_from_db()
    assert model.memory_mb == 1500  # 2250 / 1.5: new submissions reserve what this job now reserves
    assert Job.objects.get(id=waiting.id).memory_mb == 2250
    assert active_allocations(job) == []


def test_the_grown_estimate_is_capped_at_the_largest_device_and_oom_retries_are_bounded(alice, device):
    job = make_job(alice, memory_mb=6000)
    for attempt in range(1, services.OOM_RETRY_LIMIT + 1):
        job = processing(job)
        job = services.job_attempt_failed(job_id=job.id, attempt=attempt, error="CUDA out of memory", oom=True)
        assert job.state == State.PENDING
        assert job.memory_mb <= 10_000
    assert job.memory_mb == 10_000

    job = processing(job)
    job = services.job_attempt_failed(job_id=job.id, attempt=job.attempt, error="CUDA out of memory", oom=True)

    assert job.state == State.FAILED
    assert "Out of device memory 4 times, last with 10000 MiB reserved" in job.error


def test_a_job_running_past_the_task_timeout_fails_and_frees_its_memory(alice, device):
    scheduler(task_timeout_s=60)
    job = processing(make_job(alice))
    Job.objects.filter(id=job.id).update(started_at=timezone.now() - timedelta(seconds=61))

    assert services.jobs_recover_lost() == 1

    job.refresh_from_db()
    assert job.state == State.FAILED and job.error == "Timed out: still running after 60 s."
    assert active_allocations(job) == []
    assert services.job_heartbeat(job_id=job.id, attempt=1) is False


def test_a_job_whose_worker_died_keeps_its_place_ahead_of_later_jobs(alice, bob, device):
    crashed = processing(make_job(alice, waited_s=60))
    submitted_at = crashed.queued_at
    later = make_job(bob, waited_s=10)  # waiting while the first one ran
    Allocation.objects.filter(job=crashed).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert services.jobs_recover_lost() == 1
    crashed.refresh_from_db()
    assert crashed.queued_at == submitted_at
    Job.objects.filter(id=crashed.id).update(not_before=None)  # the backoff has passed
    assert [j.id for j in pending_queue()] == [crashed.id, later.id]


def test_the_reaper_requeues_a_job_whose_lease_lapsed_and_fails_it_after_max_attempts(alice, device):
    scheduler(max_retries=1)
    job = processing(make_job(alice))
    Allocation.objects.filter(job=job).update(lease_expires_at=timezone.now() - timedelta(seconds=1))

    assert services.jobs_recover_lost() == 1

    job.refresh_from_db()
    assert job.state == State.PENDING and job.failures == 1
    assert "Attempt 1 lost: the worker stopped renewing its lease" in job.error
    assert Allocation.objects.get(job=job).release_reason == "lease expired"
    assert job.files.get().state == AudioFile.State.PENDING

    Job.objects.filter(id=job.id).update(not_before=None)
    job = placed(job)
    Allocation.objects.filter(job=job, released_at__isnull=True).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    services.jobs_recover_lost()

    job.refresh_from_db()
    assert job.state == State.FAILED and job.error.startswith("Failed after 2 attempt(s): Attempt 2 lost")
    assert active_allocations(job) == []


def test_a_running_job_whose_allocation_was_released_by_hand_is_requeued(alice, device):
    job = placed(make_job(alice))
    Allocation.objects.filter(job=job).update(released_at=timezone.now(), release_reason="admin")

    assert services.jobs_recover_lost() == 1

    job.refresh_from_db()
    assert job.state == State.PENDING and "its memory reservation was released" in job.error


def test_a_pending_job_larger_than_every_device_fails_when_the_devices_shrink(alice, device):
    job = make_job(alice, memory_mb=9000)
    device.total_mb = 8000
    device.save()

    services.jobs_recover_lost()

    job.refresh_from_db()
    assert job.state == State.FAILED and job.error == "Needs 9000 MiB; the largest device can give 8000 MiB."


# --- Cancel, retry, delete ---


@pytest.mark.parametrize("state", [State.PENDING, State.LOADING, State.PROCESSING])
def test_cancel_in_each_state_frees_the_memory_for_the_next_job(alice, state, django_capture_on_commit_callbacks):
    device = make_device(make_node(), total_mb=2000)
    job = make_job(alice, memory_mb=1500)
    if state == State.LOADING:
        job = placed(job)
    elif state == State.PROCESSING:
        job = processing(job)
    assert job.state == state
    waiting = make_job(alice, memory_mb=1500)

    with django_capture_on_commit_callbacks(execute=True):
        job = services.job_cancel(job=job)

    assert job.state == State.CANCELLED and job.finished_at is not None
    assert active_allocations(job) == []
    if state != State.PENDING:
        waiting.refresh_from_db()
        assert waiting.state == State.LOADING and waiting.device == device
        assert services.job_heartbeat(job_id=job.id, attempt=1) is False
        audio = job.files.get()
        assert services.job_report_progress(job_id=job.id, attempt=1, file_id=audio.id, file_progress=0.5) is False


def test_a_finished_job_cannot_be_cancelled(alice, device):
    job = make_job(alice, state=State.COMPLETED)

    with pytest.raises(JobStateError, match="already completed"):
        services.job_cancel(job=job)


def test_retry_puts_a_failed_job_back_with_a_fresh_budget_and_keeps_finished_files(alice, model, device):
    job = processing(make_job(alice, durations=(10.0, 10.0)))
    done, undone = job.files.all()
    services.job_file_completed(job_id=job.id, attempt=1, file_id=done.id, result={"text": "kept"}, seconds=1)
    services.job_file_failed(job_id=job.id, attempt=1, file_id=undone.id, error="bad")
    Job.objects.filter(id=job.id).update(failures=3)
    services.job_complete(job_id=job.id, attempt=1, transcribe_seconds=1)
    Job.objects.filter(id=job.id).update(state=State.FAILED)

    job = services.job_retry(job=job)

    assert job.state == State.PENDING and job.failures == 0 and job.attempt == 1 and job.error == ""
    assert job.progress == pytest.approx(0.5)
    done.refresh_from_db()
    undone.refresh_from_db()
    assert (done.state, done.text) == (AudioFile.State.COMPLETED, "kept")
    assert undone.state == AudioFile.State.PENDING
    with pytest.raises(JobStateError):
        services.job_retry(job=job)


def test_delete_stops_a_running_job_and_removes_its_files(alice, model, device, settings, django_capture_on_commit_callbacks):
    job = services.job_create(user=alice, files=[upload("a.wav"), upload("b.wav")], model_name="tiny.en")
    job = processing(job)
    assert len(media_files(settings)) == 2

    with django_capture_on_commit_callbacks(execute=True):
        services.job_delete(job=job)

    assert not Job.objects.filter(id=job.id).exists()
    assert not AudioFile.objects.exists() and not JobEvent.objects.exists()
    assert media_files(settings) == []
    assert not (settings.MEDIA_ROOT / "audio" / str(job.id)).exists()
    assert memory_figures()[device.id].allocated_mb == 0
    assert services.job_heartbeat(job_id=job.id, attempt=1) is False


# --- Selectors ---


def test_a_job_is_visible_to_its_owner_and_staff_only(alice, bob, charlie):
    job = make_job(alice)

    assert job_get_for_user(user=alice, job_id=job.id) == job
    assert job_get_for_user(user=charlie, job_id=str(job.id)) == job
    for user, job_id in ((bob, job.id), (alice, "x"), (alice, job.id + 1)):
        with pytest.raises(Http404):
            job_get_for_user(user=user, job_id=job_id)


def test_the_pending_queue_has_positions_and_start_estimates(alice, device):
    scheduler(max_concurrent_tasks=1)
    running = placed(make_job(alice, durations=(60.0,)))
    first = make_job(alice, durations=(30.0,), priority=Job.Priority.HIGH)
    second = make_job(alice, durations=(30.0,))
    too_big = make_job(alice, memory_mb=20_000, priority=Job.Priority.LOW)
    now = timezone.now()

    queue = pending_queue(now=now)

    assert [(j.id, j.position) for j in queue] == [(first.id, 1), (second.id, 2), (too_big.id, 3)]
    # No history: real-time speed plus a load allowance for each job ahead.
    assert queue[0].estimated_start >= running.started_at + timedelta(seconds=60)
    assert queue[1].estimated_start == queue[0].estimated_start + timedelta(seconds=30 + 5)
    assert queue[2].estimated_start is None


# --- Admin ---


@pytest.fixture
def admin_client(client, db):
    from django.contrib.auth import get_user_model

    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "x"))
    return client


def test_admin_lists_jobs_and_cancels_through_the_service(admin_client, alice, device):
    job = placed(make_job(alice))

    assert admin_client.get("/admin/jobs/job/").status_code == 200
    page = admin_client.get(f"/admin/jobs/job/{job.id}/change/")
    assert page.status_code == 200 and "placed on" in page.content.decode()  # the event history inline
    admin_client.post("/admin/jobs/job/", {"action": "cancel_selected", "_selected_action": [job.id]})

    assert state_of_job(job) == State.CANCELLED
    assert active_allocations(job) == []


def test_admin_delete_removes_the_files_too(admin_client, alice, model, device, settings, django_capture_on_commit_callbacks):
    job = services.job_create(user=alice, files=[upload()], model_name="tiny.en")

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(f"/admin/jobs/job/{job.id}/delete/", {"post": "yes"})

    assert response.status_code == 302
    assert not Job.objects.exists() and media_files(settings) == []


def state_of_job(job) -> str:
    return Job.objects.values_list("state", flat=True).get(id=job.id)


def test_every_end_of_a_job_schedules_its_callback_and_a_requeue_does_not(monkeypatch, alice):
    """The callback hook sits where final transitions are recorded; retries are not ends."""
    job = make_job(alice)
    scheduled = []
    monkeypatch.setattr(services, "job_callback_schedule", lambda *, job_id: scheduled.append(job_id))
    services._event(job.id, "processing", "pending", 1, message="requeued")
    services._event(job.id, "pending", "loading", 2)
    assert scheduled == []
    for final in ("completed", "failed", "cancelled"):
        services._event(job.id, "processing", final, 2)
    assert scheduled == [job.id] * 3


def test_cancelling_a_job_with_a_callback_url_queues_its_callback(alice, django_capture_on_commit_callbacks):
    from django_q.models import OrmQ

    job = make_job(alice, callback_url="https://example.com/hook")
    with django_capture_on_commit_callbacks(execute=True):
        services.job_cancel(job=job)
    assert [t.task["func"] for t in OrmQ.objects.all()] == ["jobs.tasks_callbacks.send_job_callback"]
