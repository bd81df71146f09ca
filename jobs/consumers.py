"""The user socket (/ws/jobs/): the state of one's own jobs, then every change to them.

Events (whisperhub/live.py) reach this socket through a per-user group and carry only a
job id; the job is re-read through job_get_for_user, the helper pages and API use, so a
misrouted event still cannot show one user's job to another.
"""

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.http import Http404

from jobs.models import Job
from whisperhub import live

RECENT_FINISHED = 20
ACTIVE_SHOWN = 200
CLOSE_UNAUTHENTICATED = 4401


class JobsConsumer(AsyncJsonWebsocketConsumer):
    group = None

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        # Join before reading: a change committed between the read and the join would be lost,
        # one committed after the join is merely sent twice.
        self.group = live.user_group(user.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_json({"type": "jobs", "jobs": await database_sync_to_async(self._jobs_state)()})

    async def disconnect(self, code):
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content, **kwargs):
        if content.get("type") == "refresh":
            await self.send_json({"type": "jobs", "jobs": await database_sync_to_async(self._jobs_state)()})

    async def job_changed(self, event):
        message = await database_sync_to_async(self._job_message)(event["job_id"])
        if message is not None:
            await self.send_json(message)

    def _jobs_state(self) -> list[dict]:
        """The user's unfinished jobs and the most recent finished ones, newest first."""
        from jobs.apis import job_queue_info, job_state
        from jobs.selectors import jobs_for_user

        jobs = jobs_for_user(user=self.user).prefetch_related("files")
        active = list(jobs.exclude(state__in=Job.FINAL_STATES)[:ACTIVE_SHOWN])
        finished = list(jobs.filter(state__in=Job.FINAL_STATES)[:RECENT_FINISHED])
        queue = job_queue_info() if any(job.state == Job.State.PENDING for job in active) else {}
        rows = sorted(active + finished, key=lambda job: job.created_at, reverse=True)
        return [job_state(job=job, queue=queue) for job in rows]

    def _job_message(self, job_id: int) -> dict | None:
        from jobs.apis import job_state
        from jobs.selectors import job_get_for_user

        try:
            job = job_get_for_user(user=self.user, job_id=job_id)
        except Http404:
            # Deleted (or, if misrouted, not theirs): say only that the id is gone from this user's view.
            return {"type": "job.removed", "job_id": job_id} if not Job.objects.filter(pk=job_id).exists() else None
        if job.user_id != self.user.pk:
            return None  # staff may read any job, but this socket shows only their own
        return {"type": "job", "job": job_state(job=job)}
