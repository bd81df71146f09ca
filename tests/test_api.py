"""REST API: submission and its refusals, reads, actions, downloads, ownership, a real round trip."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from django.core.cache import cache
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils.http import content_disposition_header
from rest_framework.throttling import ScopedRateThrottle

from jobs import tasks_callbacks
from jobs.models import Job, JobEvent
from jobs.outputs import download_filename
from jobs.services import job_create
from jobs.tasks_callbacks import job_callback_schedule, send_job_callback
from tests.portal_fixtures import cluster, cpu_device  # noqa: F401
from tests.wer import wer

pytestmark = pytest.mark.django_db
SENTENCE = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(autouse=True)
def _fresh_throttle_history():
    # Throttle counts live in the cache; one test's submissions must not count against the next.
    cache.clear()


@pytest.fixture(scope="module")
def wav_bytes(speak):
    return Path(speak("hello world")).read_bytes()


def upload(wav_bytes, name="hello.wav"):
    return SimpleUploadedFile(name, wav_bytes, content_type="audio/wav")


def stored_files(settings) -> list[Path]:
    root = Path(settings.MEDIA_ROOT)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def post_job(api, files, **fields):
    return api.post("/api/jobs/", {"files": files, **fields}, format="multipart")


# --- Submission -----------------------------------------------------------------------------------


def test_submit_returns_201_with_the_job(alice_api, alice, tiny_model, wav_bytes, settings):
    response = post_job(
        alice_api,
        [upload(wav_bytes, "a.wav"), upload(wav_bytes, "b.wav")],
        model="tiny.en",
        language="en",
        priority="low",
        output_formats="srt,vtt",
        word_timestamps="true",
        name="meeting",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    job = Job.objects.get(pk=body["id"])
    assert (job.user, job.source, job.priority, job.word_timestamps) == (alice, "api", "low", True)
    assert body["state"] == "pending" and body["progress"] == 0 and body["queue_position"] == 1
    assert body["name"] == "meeting" and body["output_formats"] == ["srt", "vtt"]
    assert [(f["name"], f["state"]) for f in body["files"]] == [("a.wav", "pending"), ("b.wav", "pending")]
    assert all(p.is_relative_to(Path(settings.MEDIA_ROOT)) for p in stored_files(settings))
    assert len(stored_files(settings)) == 2


def test_output_formats_may_be_repeated_fields(alice_api, tiny_model, wav_bytes):
    response = post_job(alice_api, [upload(wav_bytes)], model="tiny.en", output_formats=["txt", "json"])
    assert response.json()["output_formats"] == ["txt", "json"]


@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd.wav", "..\\..\\windows\\evil.wav", "/etc/shadow.wav", "Grüße aus 東京 🎙.wav", "a\r\nb\".wav"],
)
def test_path_tricks_in_file_names_stay_inside_media_root(alice_api, tiny_model, wav_bytes, settings, name):
    response = post_job(alice_api, [upload(wav_bytes, name)], model="tiny.en")
    assert response.status_code == 201, response.content
    files = stored_files(settings)
    assert len(files) == 1
    media = Path(settings.MEDIA_ROOT).resolve()
    assert files[0].resolve().is_relative_to(media / "audio")
    assert re.fullmatch(r"[0-9a-f]{32}(\.wav)?", files[0].name)  # a random name, never the user's
    assert "/" not in response.json()["files"][0]["name"]


@pytest.mark.parametrize(
    "original,header",
    [
        ("../../etc/passwd.wav", 'attachment; filename="passwd.srt"'),
        ("Grüße 東京.wav", "attachment; filename*=utf-8''Gr%C3%BC%C3%9Fe%20%E6%9D%B1%E4%BA%AC.srt"),
        ('a\r\nb";x.wav', 'attachment; filename="a__b__x.srt"'),
        ("...", 'attachment; filename="transcript.srt"'),
    ],
)
def test_download_names_are_safe(original, header):
    assert content_disposition_header(True, download_filename(original, "srt")) == header


BAD_INPUT = [
    # (fields, files, field named in the error, status)
    ({"model": "tiny.en"}, None, "files", 400),
    ({"model": "tiny.en"}, [("empty.wav", b"")], "files", 400),
    ({"model": "tiny.en"}, [("notes.wav", b"just some text, not audio" * 20)], "files", 400),
    ({"model": "no-such-model"}, "wav", "model", 400),
    ({"model": "tiny.en", "language": "klingon"}, "wav", "language", 400),
    ({"model": "tiny.en", "language": "de"}, "wav", "language", 400),  # tiny.en is English-only
    ({"model": "tiny.en", "task": "summarize"}, "wav", "task", 400),
    ({"model": "tiny.en", "task": "translate"}, "wav", "task", 400),  # English-only models cannot translate
    ({"model": "tiny.en", "priority": "urgent"}, "wav", "priority", 400),
    ({"model": "tiny.en", "output_formats": "srt,docx"}, "wav", "output_formats", 400),
    ({"model": "tiny.en", "temperature": "7"}, "wav", "temperature", 400),
    ({"model": "tiny.en", "beam_size": "0"}, "wav", "beam_size", 400),
    ({"model": "tiny.en", "callback_url": "ftp://example.com/x"}, "wav", "callback_url", 400),
    ({"model": "tiny.en", "callback_url": "file:///etc/passwd"}, "wav", "callback_url", 400),
]


@pytest.mark.parametrize("fields,files,field,status", BAD_INPUT)
def test_bad_input_names_the_field_and_leaves_nothing(alice_api, tiny_model, wav_bytes, settings, fields, files, field, status):
    if files == "wav":
        files = [upload(wav_bytes)]
    elif files:
        files = [SimpleUploadedFile(name, content) for name, content in files]
    response = alice_api.post("/api/jobs/", {**fields, **({"files": files} if files else {})}, format="multipart")
    assert response.status_code == status, response.content
    assert field in response.json(), response.json()
    assert not Job.objects.exists()
    assert stored_files(settings) == []


def test_a_file_over_the_size_limit_is_413(alice_api, tiny_model, wav_bytes, settings):
    settings.MAX_UPLOAD_MB = 1
    big = wav_bytes + b"\0" * (1024 * 1024)
    response = post_job(alice_api, [upload(big, "long.wav")], model="tiny.en")
    assert response.status_code == 413
    assert "long.wav" in response.json()["files"][0]
    assert not Job.objects.exists() and stored_files(settings) == []


def test_too_many_files_is_413_json_not_an_error_page(alice_api, tiny_model, wav_bytes, settings):
    settings.MAX_FILES_PER_JOB = settings.DATA_UPLOAD_MAX_NUMBER_FILES = 2
    response = post_job(alice_api, [upload(wav_bytes, f"{i}.wav") for i in range(3)], model="tiny.en")
    assert response.status_code == 413
    assert "at most 2" in response.json()["files"][0]
    assert not Job.objects.exists() and stored_files(settings) == []


def test_a_json_body_is_told_to_send_multipart(alice_api, tiny_model):
    response = alice_api.post("/api/jobs/", {"model": "tiny.en"}, format="json")
    assert response.status_code == 400
    assert "multipart/form-data" in response.json()["files"][0]


def test_another_body_type_is_refused_naming_the_field(alice_api, tiny_model):
    response = alice_api.post("/api/jobs/", b"RIFF....", content_type="audio/wav")
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["files"][0]
    assert not Job.objects.exists()


def test_language_auto_means_detect(alice_api, tiny_model, wav_bytes):
    response = post_job(alice_api, [upload(wav_bytes)], model="tiny.en", language="auto")
    assert response.status_code == 201 and response.json()["language"] == ""


def test_submissions_are_rate_limited_per_user(alice_api, bob_api, tiny_model, wav_bytes, monkeypatch):
    monkeypatch.setattr(ScopedRateThrottle, "THROTTLE_RATES", {"submit": "2/hour"})
    codes = [post_job(alice_api, [upload(wav_bytes)], model="tiny.en").status_code for _ in range(3)]
    assert codes == [201, 201, 429]
    assert post_job(bob_api, [upload(wav_bytes)], model="tiny.en").status_code == 201
    assert alice_api.get("/api/jobs/").status_code == 200  # reading is not limited


def test_anonymous_requests_are_refused(client):
    assert client.get("/api/jobs/").status_code in (401, 403)
    assert client.post("/api/jobs/").status_code in (401, 403)


# --- Reading ---------------------------------------------------------------------------------------


def make_jobs(user, count, state="completed"):
    return Job.objects.bulk_create([Job(user=user, model_name="tiny.en", state=state, name=f"job {i}") for i in range(count)])


def test_list_is_paginated_filtered_and_only_mine(alice_api, alice, bob):
    make_jobs(alice, 27)
    make_jobs(alice, 2, state="failed")
    make_jobs(bob, 3)
    first = alice_api.get("/api/jobs/").json()
    assert first["count"] == 29 and len(first["results"]) == 25 and first["next"]
    assert len(alice_api.get(first["next"]).json()["results"]) == 4
    failed = alice_api.get("/api/jobs/", {"state": "failed"}).json()
    assert failed["count"] == 2 and {j["state"] for j in failed["results"]} == {"failed"}
    assert alice_api.get("/api/jobs/", {"state": "bogus"}).status_code == 400


def test_list_by_ids_for_the_polling_page(alice_api, alice, bob):
    mine = make_jobs(alice, 3)
    theirs = make_jobs(bob, 1)
    ids = [mine[0].pk, mine[2].pk, theirs[0].pk]
    body = alice_api.get("/api/jobs/", {"id": ids}).json()
    assert sorted(j["id"] for j in body["results"]) == sorted([mine[0].pk, mine[2].pk])


@pytest.mark.parametrize("count", [3, 12])
def test_list_query_count_is_pinned(alice_api, alice, count, django_assert_num_queries):
    make_jobs(alice, count)
    # token + user, count, the page of jobs (device joined), their files (one prefetch)
    with django_assert_num_queries(4):
        response = alice_api.get("/api/jobs/")
    assert len(response.json()["results"]) == count


@pytest.mark.parametrize("count", [3, 12])
def test_list_with_pending_jobs_adds_only_the_queue_estimate(alice_api, alice, count, django_assert_num_queries):
    make_jobs(alice, count, state="pending")
    # the 4 above, then the queue estimate: scheduler settings, pending jobs in order,
    # running jobs, enabled devices, and two figures of recent speed
    with django_assert_num_queries(4 + 6):
        response = alice_api.get("/api/jobs/")
    assert [j["queue_position"] for j in response.json()["results"]] == list(range(count, 0, -1))


def test_models_lists_installed_enabled_models_with_memory(alice_api, tiny_model):
    from jobs.models import WhisperModel

    WhisperModel.objects.filter(name="large-v3").update(checkpoint="")
    body = alice_api.get("/api/models/").json()
    names = [m["name"] for m in body]
    assert names == ["tiny.en"]
    assert body[0]["memory_mb"] == 1024 and body[0]["reservation_mb"] == 1536 and body[0]["default"] is True


def test_schema_and_offline_docs_page(alice_client):
    schema = alice_client.get("/api/schema/", headers={"Accept": "application/json"})
    assert schema.status_code == 200
    paths = json.loads(schema.content)["paths"]
    assert "/api/jobs/" in paths and "/api/jobs/{job_id}/files/{file_id}/download" in paths
    docs = alice_client.get("/api/schema/docs/").content.decode()
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/" in docs
    assert "cdn.jsdelivr" not in docs and "unpkg" not in docs


# --- Actions and ownership --------------------------------------------------------------------------


def test_cancel_retry_delete(alice_api, alice, tiny_model, wav_bytes, settings, django_capture_on_commit_callbacks):
    job_id = post_job(alice_api, [upload(wav_bytes)], model="tiny.en").json()["id"]
    assert alice_api.post(f"/api/jobs/{job_id}/retry/").status_code == 409  # pending: nothing to retry
    cancelled = alice_api.post(f"/api/jobs/{job_id}/cancel/")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = alice_api.post(f"/api/jobs/{job_id}/cancel/")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    retried = alice_api.post(f"/api/jobs/{job_id}/retry/")
    assert retried.status_code == 200 and retried.json()["state"] == "pending"

    assert len(stored_files(settings)) == 1
    with django_capture_on_commit_callbacks(execute=True):
        assert alice_api.delete(f"/api/jobs/{job_id}/").status_code == 204
    assert alice_api.get(f"/api/jobs/{job_id}/").status_code == 404
    assert stored_files(settings) == []


def test_download_refuses_unknown_formats_and_unfinished_files(alice_api, tiny_model, wav_bytes):
    body = post_job(alice_api, [upload(wav_bytes)], model="tiny.en").json()
    url = f"/api/jobs/{body['id']}/files/{body['files'][0]['id']}/download"
    unfinished = alice_api.get(url, {"format": "srt"})
    assert unfinished.status_code == 409 and "no result yet" in unfinished.json()["detail"]
    unknown = alice_api.get(url, {"format": "docx"})
    assert unknown.status_code == 400 and "format" in unknown.json()
    assert alice_api.get(f"/api/jobs/{body['id']}/files/999999/download").status_code == 404


def test_alice_cannot_reach_bobs_job_through_any_route(alice_api, bob_api, tiny_model, wav_bytes):
    body = post_job(bob_api, [upload(wav_bytes)], model="tiny.en").json()
    job_id, file_id = body["id"], body["files"][0]["id"]
    assert alice_api.get(f"/api/jobs/{job_id}/").status_code == 404
    assert alice_api.post(f"/api/jobs/{job_id}/cancel/").status_code == 404
    assert alice_api.post(f"/api/jobs/{job_id}/retry/").status_code == 404
    assert alice_api.delete(f"/api/jobs/{job_id}/").status_code == 404
    assert alice_api.get(f"/api/jobs/{job_id}/files/{file_id}/download", {"format": "txt"}).status_code == 404
    assert job_id not in [j["id"] for j in alice_api.get("/api/jobs/", {"id": [job_id]}).json()["results"]]
    assert Job.objects.get(pk=job_id).state == "pending"


# --- Callbacks --------------------------------------------------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    received: list = []
    status = 200

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        type(self).received.append((self.headers["X-WhisperHub-Event"], json.loads(self.rfile.read(length))))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    _Receiver.received, _Receiver.status = [], 200
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, _Receiver
    server.shutdown()
    server.server_close()


def test_callback_posts_the_final_job(alice, tiny_model, wav_bytes, receiver):
    server, handler = receiver
    url = f"http://127.0.0.1:{server.server_port}/hook"
    job = job_create(user=alice, files=[upload(wav_bytes)], model_name="tiny.en", callback_url=url)
    assert send_job_callback(job.pk) is False  # still pending: nothing to say yet
    Job.objects.filter(pk=job.pk).update(state="failed", error="worker lost")
    assert send_job_callback(job.pk) is True
    event, body = handler.received[0]
    assert event == "job.failed" and body["id"] == job.pk and body["error"] == "worker lost"
    assert JobEvent.objects.filter(job=job, message__startswith="Callback delivered").exists()


def test_callback_failures_are_retried_then_recorded(alice, tiny_model, wav_bytes, receiver, monkeypatch):
    monkeypatch.setattr(tasks_callbacks, "BACKOFF_S", (0, 0, 0))
    server, handler = receiver
    handler.status = 503
    job = job_create(user=alice, files=[upload(wav_bytes)], model_name="tiny.en", callback_url=f"http://127.0.0.1:{server.server_port}/")
    Job.objects.filter(pk=job.pk).update(state="completed")
    assert send_job_callback(job.pk) is False
    assert len(handler.received) == 4  # the first try and three retries
    assert JobEvent.objects.get(job=job, message__startswith="Callback").message.endswith("failed: HTTP 503")


# --- A real round trip: real qcluster, real Whisper ---------------------------------------------------


def wait_for_final(api, job_id, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = api.get(f"/api/jobs/{job_id}/").json()
        if body["state"] in ("completed", "failed", "cancelled"):
            return body
        time.sleep(0.3)
    pytest.fail(f"job {job_id} did not finish in {timeout} s: {body}")


@pytest.mark.qcluster
def test_round_trip_with_real_whisper(alice_api, cluster, speak, receiver):
    server, handler = receiver
    audio = Path(speak(SENTENCE)).read_bytes()
    created = post_job(
        alice_api,
        [upload(audio, "Fox story.wav")],
        model="tiny.en",
        language="en",
        callback_url=f"http://127.0.0.1:{server.server_port}/done",
    )
    assert created.status_code == 201, created.content
    body = wait_for_final(alice_api, created.json()["id"])
    assert body["state"] == "completed", body
    assert body["progress"] == 100 and body["error"] == ""
    the_file = body["files"][0]
    assert the_file["state"] == "completed" and the_file["progress"] == 100
    assert wer(SENTENCE, the_file["text"]) <= 0.4, the_file["text"]

    base = f"/api/jobs/{body['id']}/files/{the_file['id']}/download"
    srt = alice_api.get(base, {"format": "srt"})
    assert srt.status_code == 200 and srt.content.decode().startswith("1\n00:00:")
    assert srt["Content-Disposition"] == 'attachment; filename="Fox story.srt"'
    assert alice_api.get(base, {"format": "vtt"}).content.decode().startswith("WEBVTT")
    assert alice_api.get(base, {"format": "tsv"}).content.decode().startswith("start\tend\ttext")
    assert json.loads(alice_api.get(base, {"format": "json"}).content)["segments"]
    assert wer(SENTENCE, alice_api.get(base).content.decode()) <= 0.4
    assert the_file["downloads"]["srt"] == f"{base}?format=srt"

    # The job's end queued its callback; the real cluster delivers it, once.
    deadline = time.monotonic() + 30
    while not handler.received and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    assert len(handler.received) == 1, handler.received
    event, posted = handler.received[0]
    assert event == "job.completed" and posted["id"] == body["id"] and posted["files"][0]["text"] == the_file["text"]


def test_callback_is_queued_after_commit_only_for_jobs_with_a_url(alice, tiny_model, wav_bytes, django_capture_on_commit_callbacks):
    from django_q.models import OrmQ

    with_url = job_create(user=alice, files=[upload(wav_bytes)], model_name="tiny.en", callback_url="https://example.com/hook")
    without = job_create(user=alice, files=[upload(wav_bytes)], model_name="tiny.en")
    queued_before = OrmQ.objects.count()
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        job_callback_schedule(job_id=with_url.pk)
        job_callback_schedule(job_id=without.pk)
    assert len(callbacks) == 1
    assert OrmQ.objects.count() == queued_before + 1
    assert OrmQ.objects.order_by("-id").first().task["func"] == "jobs.tasks_callbacks.send_job_callback"
