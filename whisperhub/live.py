"""Live events: services say "this changed" and sockets re-read the database.

Services call job_changed / devices_changed / queue_changed inside or outside their
transaction. Each schedules one small Channels group_send after commit (events about
rows a rolled-back transaction never wrote must not go out), coalesced so that many
calls for the same thing in one transaction send once.

Events carry ids only. Consumers re-read what they show through database_sync_to_async
(with the same permission helper as pages and API), so a lost or duplicated event costs
a moment of staleness, never a wrong page, and publishing costs the caller no query.

Redis only carries these events; when it is down, publishing logs a warning and
carries on. A send is bounded by SEND_TIMEOUT_S, and after a failure sends are skipped
for BACKOFF_S, so a dead Redis costs the scheduler at most one bounded wait per
BACKOFF_S instead of one per call.
"""

import asyncio
import logging
import time
from dataclasses import dataclass

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import DEFAULT_DB_ALIAS, connections, transaction

logger = logging.getLogger(__name__)

STAFF_GROUP = "live.staff"
SEND_TIMEOUT_S = 0.5
BACKOFF_S = 5.0


def user_group(user_id: int) -> str:
    return f"live.user.{user_id}"


def job_changed(job_id: int, *, user_id: int | None = None) -> None:
    """A job's state, progress or placement changed (or it was created or deleted).

    user_id spares a query when the caller knows the owner; it is needed for a job
    that is deleted in the same transaction, whose owner cannot be read after commit.
    """
    _schedule(_Publish("job", job_id, user_id))


def devices_changed() -> None:
    """Device inventory, telemetry or allocations changed."""
    _schedule(_Publish("devices"))


def queue_changed() -> None:
    """The pending queue or the set of running jobs changed."""
    _schedule(_Publish("queue"))


def alerts_changed() -> None:
    """An alert fired or resolved."""
    _schedule(_Publish("alerts"))


@dataclass(frozen=True)
class _Publish:
    """One pending send; equal instances are the same event, which is how calls coalesce."""

    kind: str
    job_id: int | None = None
    user_id: int | None = None

    def __call__(self) -> None:
        try:
            for group, message in self._messages():
                _send(group, message)
        except Exception:  # noqa: BLE001 - a live event must never fail the caller's work
            logger.warning("live event %s not published", self, exc_info=True)

    def _messages(self):
        if self.kind != "job":
            return [(STAFF_GROUP, {"type": f"{self.kind}.changed"})]
        message = {"type": "job.changed", "job_id": self.job_id}
        user_id = self.user_id or _job_owner(self.job_id)
        groups = [STAFF_GROUP] + ([user_group(user_id)] if user_id else [])
        return [(group, message) for group in groups]


def _job_owner(job_id: int) -> int | None:
    from jobs.models import Job

    return Job.objects.filter(pk=job_id).values_list("user_id", flat=True).first()


def _schedule(event: _Publish) -> None:
    try:
        connection = connections[DEFAULT_DB_ALIAS]
        # Coalesce: the same event already waiting for this transaction's commit.
        # Django drops callbacks of rolled-back (savepoint) blocks from run_on_commit,
        # so a rollback never leaves a stale entry that would swallow a later call.
        if connection.in_atomic_block and any(func == event for _, func, _ in connection.run_on_commit):
            return
        transaction.on_commit(event, robust=True)
    except Exception:  # noqa: BLE001
        logger.warning("live event %s not scheduled", event, exc_info=True)


_down_until = 0.0  # monotonic time before which Redis is assumed down (shared by threads; races are harmless)


def _send(group: str, message: dict) -> None:
    if time.monotonic() < _down_until:
        return
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:
        # Sync code running on an event loop's thread can't block on it: send from the loop.
        task = loop.create_task(_bounded_group_send(layer, group, message))
        _in_flight.add(task)
        task.add_done_callback(_task_done)
        return
    try:
        async_to_sync(_bounded_group_send)(layer, group, message)
    except Exception as exc:  # noqa: BLE001 - Redis down, timeout, serialisation: all only cost liveness
        _failed(group, exc)


_in_flight: set = set()  # strong references, so the loop doesn't drop a pending send


def _task_done(task) -> None:
    _in_flight.discard(task)
    if not task.cancelled() and task.exception() is not None:
        _failed("(from the loop)", task.exception())


def _failed(group: str, exc: BaseException) -> None:
    global _down_until
    _down_until = time.monotonic() + BACKOFF_S
    logger.warning("live events paused for %.0f s: group_send to %s failed: %r", BACKOFF_S, group, exc)


async def _bounded_group_send(layer, group: str, message: dict) -> None:
    # A blackholed Redis host would otherwise hold the caller for the TCP connect timeout.
    await asyncio.wait_for(layer.group_send(group, message), SEND_TIMEOUT_S)


def publishing_resume() -> None:
    """Forget a previous failure (tests, or after Redis is known to be back)."""
    global _down_until
    _down_until = 0.0
