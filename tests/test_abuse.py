"""Bad input and abuse: a catalogue of bad requests across pages, API, OpenAI endpoint and sockets.

Every case must get a clear 4xx with a message, store nothing (no Job or AudioFile row, no file
under MEDIA_ROOT), and log no ERROR on django.request (Django's record of a 500). Then: upload
size limits, submission throttling, and secure cookies and headers when served over HTTPS.
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from rest_framework.test import APIClient

from accounts.services import token_get_or_create
from jobs.models import AudioFile, Job
from tests.conftest import PASSWORD, api_client_for
from tests.scheduling import install_model, tone_wav
from whisperhub.asgi import application

pytestmark = pytest.mark.django_db

MAX_UPLOAD_MB = 1
MAX_FILES = 2
WAV = tone_wav(0.5)
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8ffff3f0005fe02fe0dc7d1f40000000049454e44ae426082")


@pytest.fixture(autouse=True)
def _limits(settings, tmp_path):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.MAX_UPLOAD_MB = MAX_UPLOAD_MB
    settings.MAX_FILES_PER_JOB = MAX_FILES
    settings.DATA_UPLOAD_MAX_NUMBER_FILES = MAX_FILES


@pytest.fixture(autouse=True)
def _fresh_throttle_history():
    from django.core.cache import cache

    cache.clear()  # throttle counts live in the cache


@pytest.fixture
def model(tmp_path):
    checkpoint = tmp_path / "tiny.en.pt"
    checkpoint.write_bytes(b"weights")  # validation only checks that the checkpoint is there
    return install_model(checkpoint)


def upload(content=WAV, name="clip.wav", content_type="audio/wav"):
    return SimpleUploadedFile(name, content, content_type=content_type)


def too_big() -> bytes:
    return WAV + b"\0" * (MAX_UPLOAD_MB * 1024 * 1024)


# Each case: (id, interface, method, path, request kwargs builder, expected status, expected text in the body).
# interface: "api" (alice's token), "anon-api", "openai" (alice's key as Bearer), "page" (alice's session),
# "page-csrf" (alice's session, CSRF enforced), "anon-csrf" (no session, CSRF enforced).
def api_post(**fields):
    return lambda: {"data": {k: (v() if callable(v) else v) for k, v in fields.items()}, "format": "multipart"}


def form_post(**fields):
    return lambda: {"data": {k: (v() if callable(v) else v) for k, v in fields.items()}}


CASES = [
    # --- REST API submission ---
    ("api: no file", "api", "post", "/api/jobs/", api_post(model="tiny.en"), 400, "No file"),
    ("api: empty file", "api", "post", "/api/jobs/", api_post(files=lambda: [upload(b"")]), 400, "empty"),
    ("api: file over the size limit", "api", "post", "/api/jobs/", api_post(files=lambda: [upload(too_big())]), 413, f"{MAX_UPLOAD_MB} MB"),
    ("api: too many files", "api", "post", "/api/jobs/", api_post(files=lambda: [upload() for _ in range(MAX_FILES + 1)]), 413, "Too many files"),
    ("api: text renamed .wav", "api", "post", "/api/jobs/", api_post(files=lambda: [upload(b"just some text\n" * 50, "notes.wav")]), 400, "notes.wav"),
    ("api: PNG named .mp3", "api", "post", "/api/jobs/", api_post(files=lambda: [upload(PNG, "song.mp3", "audio/mpeg")]), 400, "song.mp3"),
    ("api: wav cut inside its header", "api", "post", "/api/jobs/", api_post(files=lambda: [upload(WAV[:30], "cut.wav")]), 400, "cut.wav"),
    ("api: wav with a header and no samples", "api", "post", "/api/jobs/", api_post(files=lambda: [upload(WAV[:44], "hollow.wav")]), 400, "hollow.wav"),
    ("api: unknown model", "api", "post", "/api/jobs/", api_post(files=lambda: [upload()], model="gpt-5"), 400, "Unknown model"),
    ("api: unknown language", "api", "post", "/api/jobs/", api_post(files=lambda: [upload()], language="klingon"), 400, "language"),
    ("api: non-English for an English-only model", "api", "post", "/api/jobs/", api_post(files=lambda: [upload()], language="de"), 400, "English only"),
    ("api: unknown priority", "api", "post", "/api/jobs/", api_post(files=lambda: [upload()], priority="urgent"), 400, "priority"),
    ("api: temperature of the wrong type", "api", "post", "/api/jobs/", api_post(files=lambda: [upload()], temperature="hot"), 400, "temperature"),
    ("api: beam size out of range", "api", "post", "/api/jobs/", api_post(files=lambda: [upload()], beam_size=10_000), 400, "beam_size"),
    ("api: unknown output format", "api", "post", "/api/jobs/", api_post(files=lambda: [upload()], output_formats="docx"), 400, "output_formats"),
    ("api: file:// callback", "api", "post", "/api/jobs/", api_post(files=lambda: [upload()], callback_url="file:///etc/passwd"), 400, "callback_url"),
    ("api: javascript: callback", "api", "post", "/api/jobs/", api_post(files=lambda: [upload()], callback_url="javascript:alert(1)"), 400, "callback_url"),
    ("api: prompt too long", "api", "post", "/api/jobs/", api_post(files=lambda: [upload()], initial_prompt="x" * 5000), 400, "initial_prompt"),
    ("api: name too long", "api", "post", "/api/jobs/", api_post(files=lambda: [upload()], name="n" * 500), 400, "name"),
    ("api: path tricks in a bad file's name", "api", "post", "/api/jobs/", api_post(files=lambda: [upload(b"text", "../../../etc/passwd.wav")]), 400, "passwd.wav"),
    ("api: unicode name of a bad file", "api", "post", "/api/jobs/", api_post(files=lambda: [upload(b"text", "запись 🎙️ 録音.wav")]), 400, "запись"),
    ("api: JSON to the multipart endpoint", "api", "post", "/api/jobs/", lambda: {"data": {"files": ["a.wav"], "model": "tiny.en"}, "format": "json"}, 400, "files"),
    # DRF's JSON parser is not bound by DATA_UPLOAD_MAX_MEMORY_SIZE: the body is read, then refused (docs/RELIABILITY.md).
    ("api: oversized JSON", "api", "post", "/api/jobs/", lambda: {"data": json.dumps({"model": "x" * (3 * 1024 * 1024)}), "content_type": "application/json"}, 400, "multipart"),
    ("api: malformed JSON", "api", "post", "/api/jobs/", lambda: {"data": '{"model": ', "content_type": "application/json"}, 400, "JSON"),
    ("api: unsupported content type", "api", "post", "/api/jobs/", lambda: {"data": "<job/>", "content_type": "application/xml"}, 415, "multipart/form-data"),
    ("api: no token", "anon-api", "post", "/api/jobs/", api_post(files=lambda: [upload()]), 401, "credentials"),
    ("api: forged token", "forged-api", "post", "/api/jobs/", api_post(files=lambda: [upload()]), 401, "Invalid token"),
    ("api: unknown state filter", "api", "get", "/api/jobs/?state=exploded", lambda: {}, 400, "state"),
    ("api: non-numeric id filter", "api", "get", "/api/jobs/?id=1;DROP TABLE", lambda: {}, 400, "id"),
    ("api: page past the end", "api", "get", "/api/jobs/?page=9999", lambda: {}, 404, "Invalid page"),
    ("api: unknown job", "api", "get", "/api/jobs/999999/", lambda: {}, 404, "No such job"),
    ("api: wrong method", "api", "put", "/api/jobs/", lambda: {}, 405, "not allowed"),
    # --- OpenAI-compatible endpoint ---
    ("openai: no file", "openai", "post", "/v1/audio/transcriptions", form_post(model="whisper-1"), 400, "file"),
    ("openai: no model", "openai", "post", "/v1/audio/transcriptions", form_post(file=lambda: upload()), 400, "model"),
    ("openai: unknown model", "openai", "post", "/v1/audio/transcriptions", form_post(file=lambda: upload(), model="whisper-9"), 400, "Unknown model"),
    ("openai: unknown response format", "openai", "post", "/v1/audio/transcriptions", form_post(file=lambda: upload(), model="whisper-1", response_format="docx"), 400, "response_format"),
    ("openai: temperature out of range", "openai", "post", "/v1/audio/transcriptions", form_post(file=lambda: upload(), model="whisper-1", temperature="5"), 400, "temperature"),
    ("openai: unknown language", "openai", "post", "/v1/audio/transcriptions", form_post(file=lambda: upload(), model="whisper-1", language="xx"), 400, "language"),
    ("openai: unknown timestamp granularity", "openai", "post", "/v1/audio/transcriptions", form_post(file=lambda: upload(), model="whisper-1", **{"timestamp_granularities[]": "char"}), 400, "timestamp_granularities"),
    ("openai: text renamed .mp3", "openai", "post", "/v1/audio/transcriptions", form_post(file=lambda: upload(b"hello" * 100, "a.mp3"), model="whisper-1"), 400, "a.mp3"),
    ("openai: file over the size limit", "openai", "post", "/v1/audio/transcriptions", form_post(file=lambda: upload(too_big()), model="whisper-1"), 413, f"{MAX_UPLOAD_MB} MB"),
    ("openai: translate with an English-only model", "openai", "post", "/v1/audio/translations", form_post(file=lambda: upload(), model="whisper-1"), 400, "English-only"),
    ("openai: JSON body", "openai", "post", "/v1/audio/transcriptions", lambda: {"data": json.dumps({"model": "whisper-1"}), "content_type": "application/json"}, 400, "file"),
    ("openai: missing key", "anon-api", "post", "/v1/audio/transcriptions", form_post(file=lambda: upload(), model="whisper-1"), 401, "API key"),
    ("openai: forged key", "forged-api", "post", "/v1/audio/transcriptions", form_post(file=lambda: upload(), model="whisper-1"), 401, "Invalid token"),
    ("openai: unknown model id", "openai", "get", "/v1/models/../../etc/passwd", lambda: {}, 404, ""),
    ("openai: wrong method", "openai", "get", "/v1/audio/transcriptions", lambda: {}, 405, "Allow: POST"),
    # --- Portal pages ---
    ("page: no file", "page", "post", "/jobs/new/", form_post(model="tiny.en", task="transcribe", priority="normal"), 400, "This field is required"),
    ("page: text renamed .wav", "page", "post", "/jobs/new/", form_post(files=lambda: upload(b"text " * 100, "memo.wav"), model="tiny.en", task="transcribe", priority="normal"), 400, "memo.wav"),
    ("page: file over the size limit", "page", "post", "/jobs/new/", form_post(files=lambda: upload(too_big()), model="tiny.en", task="transcribe", priority="normal"), 400, f"{MAX_UPLOAD_MB} MB"),
    # Django refuses the extra parts itself (its plain 400 page); the page's script checks the count before sending.
    ("page: too many files", "page", "post", "/jobs/new/", form_post(files=lambda: [upload() for _ in range(MAX_FILES + 1)], model="tiny.en", task="transcribe", priority="normal"), 400, "Bad Request"),
    ("page: unknown model", "page", "post", "/jobs/new/", form_post(files=lambda: upload(), model="nope", task="transcribe", priority="normal"), 400, "Select a valid choice"),
    ("page: submission without CSRF token", "page-csrf", "post", "/jobs/new/", form_post(files=lambda: upload(), model="tiny.en", task="transcribe", priority="normal"), 403, "CSRF"),
    ("page: token rotation without CSRF token", "page-csrf", "post", "/accounts/profile/token/rotate/", lambda: {}, 403, "CSRF"),
    ("page: cancel without CSRF token", "page-csrf", "post", "/jobs/1/cancel/", lambda: {}, 403, "CSRF"),
    ("page: sign-up without CSRF token", "anon-csrf", "post", "/accounts/signup/", form_post(username="mallory", password1=PASSWORD, password2=PASSWORD), 403, "CSRF"),
    ("page: login without CSRF token", "anon-csrf", "post", "/accounts/login/", form_post(username="alice", password=PASSWORD), 403, "CSRF"),
    ("page: job id that is not a number", "page", "get", "/jobs/..%2F..%2Fetc/", lambda: {}, 404, ""),
    ("page: foreign Host header", "page-evil-host", "get", "/jobs/", lambda: {}, 400, ""),
]


@pytest.fixture
def actors(alice):
    csrf_page = Client(enforce_csrf_checks=True)
    csrf_page.force_login(alice)
    page = Client()
    page.force_login(alice)
    forged = APIClient()
    forged.credentials(HTTP_AUTHORIZATION="Bearer " + "f" * 40)
    openai = APIClient()
    openai.credentials(HTTP_AUTHORIZATION=f"Bearer {token_get_or_create(user=alice).key}")
    evil_host = Client(HTTP_HOST="evil.example.com")
    evil_host.force_login(alice)
    return {
        "api": api_client_for(alice),
        "anon-api": APIClient(),
        "forged-api": forged,
        "openai": openai,
        "page": page,
        "page-csrf": csrf_page,
        "anon-csrf": Client(enforce_csrf_checks=True),
        "page-evil-host": evil_host,
    }


def stored_files(settings) -> list[Path]:
    root = Path(settings.MEDIA_ROOT)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 30
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("name,actor,method,path,build,status,text", CASES, ids=[case[0] for case in CASES])
def test_bad_request_gets_a_clear_4xx_and_leaves_nothing(
    actors, model, settings, caplog, name, actor, method, path, build, status, text
):
    caplog.set_level(logging.WARNING, logger="django")
    response = getattr(actors[actor], method)(path, **build())

    body = response.content.decode(errors="replace")
    if response.status_code == 405 and not body:  # Django's own 405 says it in the Allow header only
        body = f"Allow: {response['Allow']}"
    assert response.status_code == status, body[:500]
    assert text in body, body[:500]
    assert body.strip(), "a refusal says why"
    assert Job.objects.count() == 0 and AudioFile.objects.count() == 0
    assert stored_files(settings) == []
    assert not server_errors(caplog)


def server_errors(caplog) -> list[str]:
    """ERROR records: django.request logs every 500 so. django.security logs refused requests
    (a foreign Host header, too many parts) at ERROR too, but answers them with a 400."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and not r.name.startswith("django.security")]


# --- Sockets ---------------------------------------------------------------------------------------


def _session_cookie(user) -> bytes:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


@pytest.mark.django_db(transaction=True)
def test_socket_abuse_is_refused_or_ignored(alice, caplog):
    """Cross-site origin, forged session, garbage frames: refused or ignored, the socket stays sane."""
    caplog.set_level(logging.WARNING)
    cookie = database_sync_to_async(_session_cookie)

    async def scenario():
        outcomes = {}
        real = await cookie(alice)
        for label, headers in (
            ("cross-site origin", [(b"cookie", real), (b"origin", b"http://evil.example.com")]),
            ("no origin, no session", []),
            ("forged session", [(b"cookie", b"sessionid=" + b"x" * 32), (b"origin", b"http://localhost")]),
        ):
            communicator = WebsocketCommunicator(application, "/ws/jobs/", headers=headers)
            connected, _ = await communicator.connect(timeout=10)
            outcomes[label] = connected
        communicator = WebsocketCommunicator(application, "/ws/jobs/", headers=[(b"cookie", real), (b"origin", b"http://localhost")])
        connected, _ = await communicator.connect(timeout=10)
        assert connected
        first = await communicator.receive_json_from(timeout=10)
        await communicator.send_to(text_data=json.dumps({"type": "refresh", "user_id": 1, "job_id": "../../"}))
        after_unknown = await communicator.receive_json_from(timeout=10)
        await communicator.send_to(text_data=json.dumps({"type": "drop tables", "x" * 100: "y" * 100_000}))
        ignored = await communicator.receive_nothing(timeout=0.5)
        await communicator.send_to(text_data=json.dumps({"type": "refresh"}))
        still_alive = await communicator.receive_json_from(timeout=10)
        await communicator.disconnect()
        return outcomes, first, after_unknown, ignored, still_alive

    outcomes, first, after_unknown, ignored, still_alive = async_to_sync(scenario)()
    assert outcomes == {"cross-site origin": False, "no origin, no session": False, "forged session": False}
    assert first["type"] == after_unknown["type"] == still_alive["type"] == "jobs"
    assert ignored
    assert not server_errors(caplog)


# --- Throttling ------------------------------------------------------------------------------------


def test_submissions_are_throttled_across_api_and_openai(actors, model, monkeypatch, settings):
    from rest_framework.throttling import SimpleRateThrottle

    monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", {"submit": "2/minute"})
    for _ in range(2):
        response = actors["api"].post("/api/jobs/", {"files": [upload()]}, format="multipart")
        assert response.status_code == 201, response.content
    refused = actors["api"].post("/api/jobs/", {"files": [upload()]}, format="multipart")
    assert refused.status_code == 429 and "throttled" in refused.json()["detail"].lower()
    openai = actors["openai"].post("/v1/audio/transcriptions", {"file": upload(), "model": "whisper-1"})
    assert openai.status_code == 429 and openai.json()["error"]["code"] == "rate_limit_exceeded"
    assert Job.objects.count() == 2
    assert len(stored_files(settings)) == 2


# --- Secure cookies and headers --------------------------------------------------------------------


def _settings_with(env: dict) -> dict:
    """Import the settings module in a fresh interpreter with `env`, the way a deployment would."""
    code = (
        "import json, whisperhub.settings as s; print(json.dumps({k: getattr(s, k, None) for k in ("
        "'DEBUG', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', 'SESSION_COOKIE_HTTPONLY', 'SECURE_HSTS_SECONDS', "
        "'SECURE_PROXY_SSL_HEADER', 'SECURE_CONTENT_TYPE_NOSNIFF', 'SECURE_REFERRER_POLICY', 'X_FRAME_OPTIONS')}))"
    )
    root = Path(__file__).resolve().parent.parent
    full = {**os.environ, "DATABASE_URL": "postgresql://nobody@localhost/none", "REDIS_URL": "redis://localhost:1", **env}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=full, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_https_deployment_settings_are_secure():
    https = _settings_with({"DEBUG": "0", "WHISPERHUB_HTTPS": "1"})
    assert https["DEBUG"] is False
    assert https["SESSION_COOKIE_SECURE"] and https["CSRF_COOKIE_SECURE"] and https["SESSION_COOKIE_HTTPONLY"]
    assert https["SECURE_HSTS_SECONDS"] >= 31536000
    assert https["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert https["SECURE_CONTENT_TYPE_NOSNIFF"] and https["X_FRAME_OPTIONS"] == "DENY"
    assert https["SECURE_REFERRER_POLICY"] == "same-origin"
    plain = _settings_with({"DEBUG": "0", "WHISPERHUB_HTTPS": "0"})
    assert not plain["SESSION_COOKIE_SECURE"]  # plain HTTP on a LAN: a Secure cookie would never come back


def test_responses_carry_security_headers_and_secure_cookies_over_https(alice, settings):
    settings.DEBUG = False
    settings.SESSION_COOKIE_SECURE = True
    settings.CSRF_COOKIE_SECURE = True
    settings.SECURE_HSTS_SECONDS = 31536000
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    client = Client(HTTP_X_FORWARDED_PROTO="https")

    login_page = client.get("/accounts/login/")
    response = client.post("/accounts/login/", {"username": "alice", "password": PASSWORD})

    assert response.status_code == 302
    for page in (login_page, response):
        assert page["X-Content-Type-Options"] == "nosniff"
        assert page["X-Frame-Options"] == "DENY"
        assert page["Referrer-Policy"] == "same-origin"
        assert page["Strict-Transport-Security"].startswith("max-age=31536000")
    session = response.cookies["sessionid"]
    assert session["secure"] and session["httponly"] and session["samesite"] == "Lax"
    assert login_page.cookies["csrftoken"]["secure"]
    # The API answers with the same headers.
    api = client.get("/api/me/")
    assert api["X-Content-Type-Options"] == "nosniff" and api["X-Frame-Options"] == "DENY"
