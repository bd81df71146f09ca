"""django-q2 task functions: thin interfaces that take ids and call the executor or services.

Enqueued by the dispatcher as async_task("jobs.tasks.run_job", job_id, attempt, cluster=...).
"""

from jobs.executor import job_run


def run_job(job_id: int, attempt: int) -> str:
    """Run attempt `attempt` of job `job_id` on this worker; safe to deliver more than once."""
    return job_run(job_id=int(job_id), attempt=int(attempt))
