"""Portal pages with Django's test client: submit, list, job page, cancel, retry, delete, ownership."""

from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from jobs.models import Job
from jobs.services import job_cancel, job_create

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def wav_bytes(speak):
    return Path(speak("hello world")).read_bytes()


def upload(wav_bytes, name="hello.wav"):
    return SimpleUploadedFile(name, wav_bytes, content_type="audio/wav")


def submit(user, wav_bytes, **kwargs):
    return job_create(user=user, files=[upload(wav_bytes)], model_name="tiny.en", **kwargs)


def media_files(settings) -> list[Path]:
    root = Path(settings.MEDIA_ROOT)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_new_job_page_offers_installed_models_and_languages(alice_client, tiny_model):
    body = alice_client.get(reverse("jobs:new")).content.decode()
    assert '<option value="tiny.en" selected>' in body
    assert '<option value="de">German</option>' in body
    assert 'type="file"' in body and "multiple" in body
    assert 'id="dropzone"' in body and "js/job_new.js" in body


def test_plain_form_post_creates_a_job_and_redirects_to_it(alice_client, alice, tiny_model, wav_bytes):
    response = alice_client.post(
        reverse("jobs:new"),
        {
            "files": [upload(wav_bytes, "one.wav"), upload(wav_bytes, "two.wav")],
            "model": "tiny.en",
            "language": "en",
            "task": "transcribe",
            "priority": "high",
            "output_formats": ["srt", "txt"],
        },
    )
    job = Job.objects.get(user=alice)
    assert response.status_code == 302
    assert response["Location"] == reverse("jobs:detail", args=[job.pk])
    assert (job.source, job.priority, job.language, job.output_formats) == ("portal", "high", "en", ["srt", "txt"])
    assert [f.original_name for f in job.files.all()] == ["one.wav", "two.wav"]


def test_script_post_gets_json_with_the_job_url(alice_client, tiny_model, wav_bytes):
    response = alice_client.post(
        reverse("jobs:new"),
        {"files": [upload(wav_bytes)], "model": "tiny.en", "task": "transcribe", "priority": "normal"},
        headers={"X-Requested-With": "XMLHttpRequest"},
    )
    assert response.status_code == 201
    assert response.json()["url"] == reverse("jobs:detail", args=[response.json()["id"]])


def test_form_errors_name_the_field_and_leave_nothing_behind(alice_client, tiny_model, settings):
    response = alice_client.post(
        reverse("jobs:new"),
        {"files": [SimpleUploadedFile("notes.wav", b"this is not audio")], "model": "tiny.en", "task": "transcribe", "priority": "normal"},
        headers={"X-Requested-With": "XMLHttpRequest"},
    )
    assert response.status_code == 400
    assert "notes.wav" in response.json()["errors"]["files"][0]["message"]
    assert not Job.objects.exists() and media_files(settings) == []

    page = alice_client.post(reverse("jobs:new"), {"model": "tiny.en", "task": "transcribe", "priority": "normal"})
    assert page.status_code == 400
    assert "This field is required." in page.content.decode()


def test_list_shows_state_progress_and_queue_position(alice_client, alice, tiny_model, wav_bytes):
    first, second = submit(alice, wav_bytes), submit(alice, wav_bytes, name="second")
    job_cancel(job=first)
    body = alice_client.get(reverse("jobs:list")).content.decode()
    assert f'data-job-id="{first.pk}" data-state="cancelled"' in body
    assert f'data-job-id="{second.pk}" data-state="pending"' in body
    assert ">#1, starts ~" in body  # the only pending job is next

    filtered = alice_client.get(reverse("jobs:list"), {"state": "cancelled"}).content.decode()
    assert f'data-job-id="{first.pk}"' in filtered and f'data-job-id="{second.pk}"' not in filtered


def test_list_paginates(alice_client, alice):
    Job.objects.bulk_create([Job(user=alice, model_name="tiny.en", state="completed", name=f"job {i}") for i in range(25)])
    first = alice_client.get(reverse("jobs:list")).content.decode()
    second = alice_client.get(reverse("jobs:list"), {"page": 2}).content.decode()
    assert first.count("data-job-id=") == 20 and second.count("data-job-id=") == 5
    assert "Page 1 of 2" in first


def test_list_query_count_does_not_grow_with_jobs(alice_client, alice, django_assert_num_queries):
    Job.objects.bulk_create([Job(user=alice, model_name="tiny.en", state="completed") for _ in range(15)])
    # session, user, count, the page of jobs, their files (one prefetch)
    with django_assert_num_queries(5):
        response = alice_client.get(reverse("jobs:list"))
    assert response.content.decode().count("data-job-id=") == 15


def test_job_page_shows_files_transcript_and_downloads(alice_client, alice, tiny_model, wav_bytes):
    job = submit(alice, wav_bytes, output_formats=["srt", "vtt"])
    audio = job.files.get()
    audio.result = {"text": " Hello world.", "language": "en", "segments": [{"id": 0, "start": 0.0, "end": 1.52, "text": " Hello world."}]}
    audio.state = "completed"
    audio.save()
    body = alice_client.get(reverse("jobs:detail", args=[job.pk])).content.decode()
    assert f'data-job-id="{job.pk}"' in body and f'data-file-id="{audio.pk}"' in body
    assert "00:00.000 → 00:01.520" in body and "Hello world." in body
    download = reverse("api-job-file-download", args=[job.pk, audio.pk])
    assert f'href="{download}?format=srt"' in body and f'href="{download}?format=vtt"' in body
    assert "?format=tsv" not in body
    assert 'data-action="cancel"' in body and 'data-action="retry"' not in body


def test_cancel_retry_delete_from_the_job_page(
    alice_client, alice, tiny_model, wav_bytes, settings, django_capture_on_commit_callbacks
):
    job = submit(alice, wav_bytes)
    assert alice_client.post(reverse("jobs:cancel", args=[job.pk])).status_code == 302
    job.refresh_from_db()
    assert job.state == "cancelled"
    page = alice_client.get(reverse("jobs:detail", args=[job.pk])).content.decode()
    assert 'data-action="retry"' in page and 'data-action="cancel"' not in page

    # Cancelling twice is refused with a message, not an error page.
    response = alice_client.post(reverse("jobs:cancel", args=[job.pk]), follow=True)
    assert "already cancelled" in response.content.decode()

    alice_client.post(reverse("jobs:retry", args=[job.pk]))
    job.refresh_from_db()
    assert job.state == "pending"

    stored = media_files(settings)
    assert len(stored) == 1
    with django_capture_on_commit_callbacks(execute=True):  # files go after commit
        response = alice_client.post(reverse("jobs:delete", args=[job.pk]))
    assert response["Location"] == reverse("jobs:list")
    assert not Job.objects.filter(pk=job.pk).exists()
    assert not stored[0].exists()


def test_actions_need_post(alice_client, alice, tiny_model, wav_bytes):
    job = submit(alice, wav_bytes)
    for name in ("jobs:cancel", "jobs:retry", "jobs:delete"):
        assert alice_client.get(reverse(name, args=[job.pk])).status_code == 405
    job.refresh_from_db()
    assert job.state == "pending"


def test_alice_cannot_see_or_touch_bobs_job(alice_client, bob, tiny_model, wav_bytes):
    job = submit(bob, wav_bytes)
    assert f'data-job-id="{job.pk}"' not in alice_client.get(reverse("jobs:list")).content.decode()
    assert alice_client.get(reverse("jobs:detail", args=[job.pk])).status_code == 404
    for name in ("jobs:cancel", "jobs:retry", "jobs:delete"):
        assert alice_client.post(reverse(name, args=[job.pk])).status_code == 404
    job.refresh_from_db()
    assert job.state == "pending"


def test_pages_need_login(client):
    for url in (reverse("jobs:list"), reverse("jobs:new"), reverse("jobs:detail", args=[1])):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
