"""The OpenAI-compatible endpoint, driven by the official `openai` package against a live server."""

import threading
import time

import openai
import pytest
import requests
from rest_framework.authtoken.models import Token

from jobs.models import Job
from jobs.services import job_cancel
from tests.portal_fixtures import cluster, cpu_device, daphne  # noqa: F401
from tests.wer import wer

SENTENCE = "the quick brown fox jumps over the lazy dog"
WER_BOUND = 0.4


@pytest.fixture
def client_for(live_server):
    """OpenAI clients on the live server; closed afterwards, so that no keep-alive connection
    holds a server thread (and its database session) past the test."""
    clients = []

    def _client(user=None, *, api_key=None):
        key = api_key or Token.objects.get(user=user).key
        clients.append(openai.OpenAI(api_key=key, base_url=live_server.url + "/v1", max_retries=0))
        return clients[-1]

    yield _client
    for client in clients:
        client.close()


@pytest.fixture(scope="module")
def fox(speak):
    return speak(SENTENCE)


@pytest.mark.qcluster
def test_every_response_format_through_the_official_client(cluster, alice, client_for, fox):
    client = client_for(alice)

    def transcribe(**kwargs):
        with open(fox, "rb") as fh:
            return client.audio.transcriptions.create(file=fh, model="whisper-1", **kwargs)

    assert wer(SENTENCE, transcribe(response_format="json").text) <= WER_BOUND

    text = transcribe(response_format="text")
    assert isinstance(text, str) and wer(SENTENCE, text) <= WER_BOUND

    srt = transcribe(response_format="srt")
    assert srt.startswith("1\n00:00:") and " --> " in srt

    vtt = transcribe(response_format="vtt")
    assert vtt.startswith("WEBVTT") and " --> " in vtt

    verbose = transcribe(response_format="verbose_json", language="en", prompt="A sentence about a fox.")
    assert verbose.language == "english" and verbose.duration == pytest.approx(3.4, abs=1.0)
    assert wer(SENTENCE, verbose.text) <= WER_BOUND
    segment = verbose.segments[0]
    assert segment.start == 0.0 and segment.end > 1 and isinstance(segment.tokens, list) and segment.avg_logprob < 0
    assert verbose.words is None

    words = transcribe(response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert len(words.words) >= 6 and words.segments
    assert all(w.start <= w.end for w in words.words)
    assert words.words[1].start >= words.words[0].start

    # Each request was an ordinary job of alice's, visible in the portal and the API.
    jobs = Job.objects.filter(user=alice, source=Job.Source.OPENAI)
    assert jobs.count() == 6 and set(jobs.values_list("state", flat=True)) == {"completed"}
    assert jobs.filter(word_timestamps=True).count() == 1


def error_of(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


def test_refusals_come_in_openai_error_shape(transactional_db, alice, tiny_model, client_for, fox, settings):
    client = client_for(alice)

    def attempt(**kwargs):
        kwargs.setdefault("file", fox.open("rb"))
        kwargs.setdefault("model", "whisper-1")
        return client.audio.transcriptions.create(**kwargs)

    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(api_key="wrong").audio.transcriptions.create(file=fox.open("rb"), model="whisper-1")
    assert error_of(caught.value)["type"] == "invalid_request_error" and caught.value.status_code == 401

    cases = [
        ({"model": "gpt-9"}, "model"),
        ({"file": ("empty.wav", b"")}, "file"),
        ({"file": ("notes.wav", b"no audio here" * 50)}, "file"),
        ({"language": "xx"}, "language"),
        ({"response_format": "docx"}, "response_format"),
        ({"temperature": 3}, "temperature"),
        ({"timestamp_granularities": ["syllable"]}, "timestamp_granularities"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            attempt(**kwargs)
        error = error_of(caught.value)
        assert (error["param"], error["type"]) == (param, "invalid_request_error"), error
        assert error["message"]

    with pytest.raises(openai.BadRequestError) as caught:  # tiny.en is English-only
        client.audio.translations.create(file=fox.open("rb"), model="tiny.en")
    assert error_of(caught.value)["param"] == "model" and "English-only" in error_of(caught.value)["message"]

    settings.MAX_UPLOAD_MB = 1
    with pytest.raises(openai.APIStatusError) as caught:
        attempt(file=("long.wav", fox.read_bytes() + b"\0" * 1024 * 1024))
    assert caught.value.status_code == 413 and error_of(caught.value)["param"] == "file"

    assert not Job.objects.exists()


@pytest.mark.parametrize(
    "content_type,body",
    [
        ("multipart/form-data", b"--nothing-like-a-boundary"),  # no boundary: not parseable
        ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data\r\n\r\n"),
        ("application/json", b'{"model": "whisper-1"}'),
    ],
)
def test_a_body_that_is_not_a_proper_upload_is_400(client, alice, content_type, body):
    key = Token.objects.get(user=alice).key
    response = client.post(
        "/v1/audio/transcriptions", body, content_type=content_type, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == "file"


def test_models_in_openai_list_shape(transactional_db, alice, tiny_model, client_for):
    client = client_for(alice)
    ids = [m.id for m in client.models.list()]
    assert ids == ["whisper-1", "tiny.en"]
    model = client.models.retrieve("tiny.en")
    assert (model.id, model.object, model.owned_by) == ("tiny.en", "model", "whisperhub")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("large-v3")  # in the catalog, but not installed
    assert error_of(caught.value)["code"] == "model_not_found"


def test_a_job_that_ends_without_a_result_answers_422_with_the_reason(transactional_db, alice, tiny_model, client_for, fox):
    """No device is registered here, so the job waits; cancelling it from the portal ends the wait."""
    client = client_for(alice)
    outcome = {}

    def request():
        try:
            client.audio.transcriptions.create(file=fox.open("rb"), model="whisper-1")
        except openai.APIStatusError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=request)
    thread.start()
    deadline = time.monotonic() + 30
    while not Job.objects.filter(user=alice).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    job_cancel(job=Job.objects.get(user=alice))
    thread.join(timeout=30)

    error = outcome["error"]
    assert error.status_code == 422 and error_of(error)["code"] == "job_cancelled"
    assert "cancelled" in error_of(error)["message"]


def test_under_daphne_a_waiting_request_leaves_the_server_free_and_ends_with_its_job(daphne, alice, tiny_model, fox):
    """The async view on the production server (live_server above is WSGI): other requests are
    served while one waits for its job, and the wait ends when the job does."""
    key = Token.objects.get(user=alice).key
    outcome = {}

    def transcribe():
        with fox.open("rb") as fh:
            outcome["response"] = requests.post(
                daphne + "/v1/audio/transcriptions",
                headers={"Authorization": f"Bearer {key}"},
                files={"file": ("fox.wav", fh, "audio/wav")},
                data={"model": "whisper-1", "response_format": "text"},
                timeout=120,
            )

    thread = threading.Thread(target=transcribe)
    thread.start()
    deadline = time.monotonic() + 30
    while not Job.objects.filter(user=alice).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    job = Job.objects.get(user=alice)  # no device is registered here: it waits in the queue

    for _ in range(3):
        answer = requests.get(daphne + "/api/models/", headers={"Authorization": f"Token {key}"}, timeout=20)
        assert answer.status_code == 200 and answer.json()[0]["name"] == "tiny.en"
    assert thread.is_alive()

    job_cancel(job=job)
    thread.join(timeout=30)
    response = outcome["response"]
    assert response.status_code == 422 and response.json()["error"]["code"] == "job_cancelled"
