"""The staff socket (/ws/dashboard/): the full dashboard snapshot, then the parts that change.

Events (whisperhub/live.py) only say what changed. Bursts are coalesced: the first event
of a kind schedules one re-read THROTTLE_S later, and everything that changed meanwhile
is read once then, so a busy pool costs a few reads per second per socket, not one per event.
"""

import asyncio
import logging

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.utils import timezone

from gpus import dashboard
from jobs.models import Job
from whisperhub import live

logger = logging.getLogger(__name__)

THROTTLE_S = 0.2
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403


class DashboardConsumer(AsyncJsonWebsocketConsumer):
    joined = False

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if not user.is_staff:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.dirty: set[str] = set()
        self.dirty_jobs: set[int] = set()
        self.flush_task: asyncio.Task | None = None
        self.job_states: dict[int, str] = {}  # last state sent per job: a transition also moves the queue
        # Join before reading the snapshot, so no change falls between the two.
        await self.channel_layer.group_add(live.STAFF_GROUP, self.channel_name)
        self.joined = True
        await self.accept()
        await self.send_json(await database_sync_to_async(dashboard.dashboard_snapshot)())

    async def disconnect(self, code):
        if self.joined:
            await self.channel_layer.group_discard(live.STAFF_GROUP, self.channel_name)
            if self.flush_task is not None:
                self.flush_task.cancel()

    async def receive_json(self, content, **kwargs):
        if content.get("type") == "refresh":
            await self.send_json(await database_sync_to_async(dashboard.dashboard_snapshot)())

    async def devices_changed(self, event):
        self._mark("devices")

    async def queue_changed(self, event):
        self._mark("queue")

    async def alerts_changed(self, event):
        self._mark("alerts")

    async def job_changed(self, event):
        self.dirty_jobs.add(event["job_id"])
        self._mark("jobs")

    def _mark(self, part: str) -> None:
        self.dirty.add(part)
        if self.flush_task is None:
            self.flush_task = asyncio.ensure_future(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(THROTTLE_S)
        parts, job_ids = self.dirty, self.dirty_jobs
        self.dirty, self.dirty_jobs = set(), set()
        self.flush_task = None
        try:
            messages = await database_sync_to_async(_messages)(parts, job_ids, self.job_states)
        except Exception:  # noqa: BLE001 - database away for a moment: ask the page to resync later
            logger.warning("dashboard refresh failed; sending a full snapshot at the next event", exc_info=True)
            self.dirty.add("snapshot")
            return
        for message in messages:
            await self.send_json(message)


def _messages(parts: set[str], job_ids: set[int], job_states: dict[int, str]) -> list[dict]:
    if "snapshot" in parts:
        return [dashboard.dashboard_snapshot()]
    now = timezone.now()
    messages = []
    if job_ids:
        jobs = Job.objects.filter(pk__in=job_ids).select_related("user", "device__node")
        found = {job.pk: dashboard.job_row(job, now=now) for job in jobs}
        messages.append({"type": "jobs", "jobs": list(found.values()), "removed": sorted(job_ids - found.keys())})
        for job_id in job_ids:
            state = found[job_id]["state"] if job_id in found else None
            if job_states.get(job_id) != state:
                parts = parts | {"queue"}
            if state is None or state in Job.FINAL_STATES:
                job_states.pop(job_id, None)  # keeps the map as small as the set of live jobs
            else:
                job_states[job_id] = state
    if "devices" in parts:
        messages.append({"type": "devices", "nodes": dashboard.nodes_state()})
    if "queue" in parts:
        messages.append({"type": "queue", **dashboard.queue_state(now=now), "figures": dashboard.figures_state(now=now)})
    if "alerts" in parts:
        messages.append({"type": "alerts", "alerts": dashboard.alerts_state()})
    return messages
