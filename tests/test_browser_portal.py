"""One run of the portal in a real headless Chromium: log in, drop a file, watch the job finish, download.

The live server here is pytest-django's (WSGI, no websockets), so the job page follows the job
through its polling fallback; the job itself goes through the real qcluster and real Whisper.
"""

import base64

import pytest
from django.db import connections

from jobs.models import Job
from tests.conftest import PASSWORD
from tests.portal_fixtures import cluster, cpu_device  # noqa: F401
from tests.wer import wer

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SENTENCE = "the quick brown fox jumps over the lazy dog"


@pytest.mark.browser
@pytest.mark.qcluster
def test_upload_watch_and_download_in_a_real_browser(cluster, live_server, alice, speak, monkeypatch, tmp_path):
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop on this thread; the ORM calls below are still
    # plain synchronous code, which Django would otherwise refuse next to a running loop.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    audio = speak(SENTENCE)
    errors = []
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            context = chromium.new_context(accept_downloads=True)
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            page.goto(live_server.url + "/accounts/login/")
            page.fill("#id_username", "alice")
            page.fill("#id_password", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url("**/jobs/")

            page.goto(live_server.url + "/jobs/new/")
            # Dropped onto the drop zone, as a user dragging the file from their desktop would.
            dropped = page.evaluate_handle(
                """([b64, name]) => {
                    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                    const transfer = new DataTransfer();
                    transfer.items.add(new File([bytes], name, { type: "audio/wav" }));
                    return transfer;
                }""",
                [base64.b64encode(audio.read_bytes()).decode(), "Fox story.wav"],
            )
            page.dispatch_event("#dropzone", "drop", {"dataTransfer": dropped})
            assert "Fox story.wav" in page.inner_text("#file-list")
            assert page.eval_on_selector("input[type=file]", "input => input.files.length") == 1
            page.select_option("#id_language", "en")
            # The page's script uploads with XMLHttpRequest (for the progress bar), then opens the job.
            with page.expect_request(lambda r: r.method == "POST" and r.headers.get("x-requested-with") == "XMLHttpRequest"):
                page.click("#submit")
            page.wait_for_url("**/jobs/*/", timeout=30000)
            job_id = page.get_attribute("#job", "data-job-id")
            # My jobs, open beside it while the job runs, follows it too.
            listing = context.new_page()
            listing.on("pageerror", lambda exc: errors.append(str(exc)))
            listing.goto(live_server.url + "/jobs/")

            page.wait_for_selector('#job[data-state="completed"]', timeout=180000)
            listing.wait_for_selector(f'tr[data-job-id="{job_id}"][data-state="completed"]', timeout=10000)
            assert listing.inner_text(f'tr[data-job-id="{job_id}"] [data-role="state"]') == "completed"
            page.wait_for_selector(".transcript")
            transcript = page.inner_text(".transcript")
            assert "00:00.000 →" in transcript

            with page.expect_download() as caught:
                page.click('[data-role="downloads"] a:text-is("srt")')
            download = caught.value
            assert download.suggested_filename == "Fox story.srt"
            srt = tmp_path / "result.srt"
            download.save_as(srt)
        finally:
            chromium.close()
            # The ORM ran inside Playwright's context, on its own connection: close it, or it
            # outlives the test and blocks dropping the test database.
            connections.close_all()

    assert errors == [], f"JavaScript errors: {errors}"
    text = srt.read_text()
    assert text.startswith("1\n00:00:"), text
    assert wer(SENTENCE, " ".join(line for line in text.splitlines() if line and "-->" not in line and not line.isdigit())) <= 0.4
    job = Job.objects.get(user=alice)
    assert (job.source, job.state, job.language) == ("portal", "completed", "en")
