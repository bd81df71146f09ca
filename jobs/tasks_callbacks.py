"""A job's callback_url receives a POST of the job's JSON (GET /api/jobs/{id}/'s shape) when it ends.

job_callback_schedule is the hook the job-ending services call; the HTTP request itself runs in
a q2 task, after commit, so no transaction waits on someone else's web server.
"""

import logging
import time

import requests
from django.db import transaction
from django_q.tasks import async_task

from jobs.models import Job, JobEvent

logger = logging.getLogger(__name__)

TIMEOUT_S = 10
BACKOFF_S = (1, 4, 16)  # pauses before the 3 retries


def job_callback_schedule(*, job_id: int) -> None:
    """Queue the callback of a job that just ended (completed, failed or cancelled), after commit.

    One indexed read decides, so jobs without a callback_url put nothing on the queue.
    """
    if Job.objects.filter(pk=job_id).exclude(callback_url="").exists():
        transaction.on_commit(lambda: async_task("jobs.tasks_callbacks.send_job_callback", job_id))


def send_job_callback(job_id: int) -> bool:
    """POST the job's final state to its callback_url; True when the receiver answered 2xx.

    Retries connection errors, timeouts and 5xx three times with backoff; a 4xx is the
    receiver refusing, and is not retried. Every outcome is written to the job's events.
    """
    from jobs.apis import job_state  # the API module imports services; keep task import light

    job = Job.objects.filter(pk=job_id).prefetch_related("files").first()
    if job is None or not job.callback_url or not job.is_final:
        return False
    body = job_state(job=job, queue={})
    outcome = ""
    for pause in (0, *BACKOFF_S):
        time.sleep(pause)
        try:
            response = requests.post(
                job.callback_url,
                json=body,
                timeout=TIMEOUT_S,
                allow_redirects=False,
                headers={"User-Agent": "WhisperHub callback", "X-WhisperHub-Event": f"job.{job.state}"},
            )
        except requests.RequestException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
            continue
        if response.status_code < 300:
            _event(job, f"Callback delivered to {job.callback_url} (HTTP {response.status_code}).")
            return True
        outcome = f"HTTP {response.status_code}"
        if response.status_code < 500:
            break
    logger.warning("callback of job %s to %s failed: %s", job.pk, job.callback_url, outcome)
    _event(job, f"Callback to {job.callback_url} failed: {outcome}"[:2000])
    return False


def _event(job: Job, message: str) -> None:
    JobEvent.objects.create(job=job, from_state=job.state, to_state=job.state, attempt=job.attempt, message=message)
