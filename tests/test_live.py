"""Live status: sockets, the dashboard snapshot, /metrics and alert rules.

Sockets run through the real ASGI application (session cookie, origin check, Redis channel
layer from settings; WHISPERHUB_CHANNEL_PREFIX keeps this run's events to itself) on
committed rows (transactional_db), because events are only published after commit.
"""

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import transaction
from django.test import Client
from django.utils import timezone

from gpus.models import Device, Node
from jobs import services as job_services
from jobs.models import Job
from whisperhub import live
from whisperhub.asgi import application

QUIET_S = 0.6  # how long "nothing arrives" is watched for


@pytest.fixture
def pool(transactional_db, settings):
    """One online node with one simulated 8 GiB device."""
    settings.WHISPERHUB_NODE_OFFLINE_AFTER = 3600.0
    node = Node.objects.create(name=settings.WHISPERHUB_NODE_NAME, cluster_name=settings.WHISPERHUB_CLUSTER_NAME, last_seen=timezone.now())
    device = Device.objects.create(node=node, index=0, uuid="sim-live-0", name="Sim 8G", kind="simulated", total_mb=8192)
    return device


@pytest.fixture
def submit(tiny_model, speak, pool):
    """submit(user) → a job made by the real job_create, on real speech; dispatch places it on commit."""
    wav = speak("one two three").read_bytes()

    def _submit(user):
        upload = SimpleUploadedFile("clip.wav", wav, content_type="audio/wav")
        return job_services.job_create(user=user, files=[upload], model_name="tiny.en")

    return _submit


def session_headers(user) -> list[tuple[bytes, bytes]]:
    client = Client()
    client.force_login(user)
    return [
        (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode()),
        (b"origin", b"http://localhost"),
    ]


async def connect(path: str, user=None) -> tuple[WebsocketCommunicator, bool, object]:
    headers = await database_sync_to_async(session_headers)(user) if user else [(b"origin", b"http://localhost")]
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, code = await communicator.connect(timeout=10)
    return communicator, connected, code


async def next_of(communicator, kind: str, timeout: float = 5) -> dict:
    """The next message of type `kind`, skipping others (e.g. queue refreshes)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise AssertionError(f"no {kind!r} message within {timeout} s")
        message = await communicator.receive_json_from(timeout=left)
        if message["type"] == kind:
            return message


async def drain(communicator, seconds: float = QUIET_S) -> list[dict]:
    """Every message that arrives within `seconds`."""
    messages = []
    # receive_nothing, not a receive timeout: asgiref's communicator cancels the app on a timeout.
    while not await communicator.receive_nothing(timeout=seconds):
        messages.append(await communicator.receive_json_from())
    return messages


def job_ids(messages: list[dict]) -> set[int]:
    ids = set()
    for m in messages:
        ids |= {j["id"] for j in m.get("jobs", [])} | ({m["job"]["id"]} if "job" in m else set()) | {m.get("job_id")}
    return ids - {None}


def start_processing(job: Job, progress: float) -> None:
    job.refresh_from_db()
    assert job.state == Job.State.LOADING, "dispatch placed the job on commit"
    assert job_services.job_start_processing(job_id=job.pk, attempt=job.attempt, load_seconds=0.1)
    file_id = job.files.get().pk
    assert job_services.job_report_progress(job_id=job.pk, attempt=job.attempt, file_id=file_id, file_progress=progress)


def report_progress(job: Job, progress: float) -> None:
    job.refresh_from_db()
    file_id = job.files.get().pk
    assert job_services.job_report_progress(job_id=job.pk, attempt=job.attempt, file_id=file_id, file_progress=progress)


# --- sockets ------------------------------------------------------------------------------------


def test_anonymous_and_non_staff_are_refused(transactional_db, alice):
    async def scenario():
        for path in ("/ws/jobs/", "/ws/dashboard/"):
            communicator, connected, code = await connect(path)
            assert (connected, code) == (False, 4401)
        communicator, connected, code = await connect("/ws/dashboard/", alice)
        assert (connected, code) == (False, 4403)

    async_to_sync(scenario)()


def test_each_user_gets_only_their_own_jobs(submit, alice, bob, charlie):
    alice_job, bob_job = submit(alice), submit(bob)

    async def scenario():
        alice_ws, ok_a, _ = await connect("/ws/jobs/", alice)
        bob_ws, ok_b, _ = await connect("/ws/jobs/", bob)
        staff_ws, ok_s, _ = await connect("/ws/dashboard/", charlie)
        assert ok_a and ok_b and ok_s
        # The current state comes first, from the database.
        assert [j["id"] for j in (await next_of(alice_ws, "jobs"))["jobs"]] == [alice_job.pk]
        assert [j["id"] for j in (await next_of(bob_ws, "jobs"))["jobs"]] == [bob_job.pk]
        snapshot = await next_of(staff_ws, "snapshot")
        assert {j["id"] for j in snapshot["running"]["jobs"]} == {alice_job.pk, bob_job.pk}

        await database_sync_to_async(start_processing)(bob_job, 0.4)
        message = await next_of(bob_ws, "job")
        while message["job"]["progress"] != 40.0:  # the loading→processing event may come first
            message = await next_of(bob_ws, "job")
        assert (message["job"]["id"], message["job"]["state"]) == (bob_job.pk, "processing")
        assert bob_job.pk not in job_ids(await drain(alice_ws)), "alice must never hear of bob's job"
        staff_jobs = await next_of(staff_ws, "jobs")
        assert bob_job.pk in [j["id"] for j in staff_jobs["jobs"]]

        await database_sync_to_async(start_processing)(alice_job, 0.25)
        seen = set()
        while 25.0 not in seen:
            message = await next_of(alice_ws, "job")
            assert message["job"]["id"] == alice_job.pk
            seen.add(message["job"]["progress"])
        assert alice_job.pk not in job_ids(await drain(bob_ws)), "bob must never hear of alice's job"
        for ws in (alice_ws, bob_ws, staff_ws):
            await ws.disconnect()

    async_to_sync(scenario)()


def test_reconnect_gets_the_current_state(submit, alice):
    job = submit(alice)

    async def scenario():
        ws, ok, _ = await connect("/ws/jobs/", alice)
        assert (await next_of(ws, "jobs"))["jobs"][0]["state"] == "loading"
        await ws.disconnect()
        # Changes while nobody listens: the events go nowhere.
        await database_sync_to_async(start_processing)(job, 0.5)
        ws, ok, _ = await connect("/ws/jobs/", alice)
        state = (await next_of(ws, "jobs"))["jobs"][0]
        assert (state["id"], state["state"], state["progress"]) == (job.pk, "processing", 50.0)
        await ws.disconnect()

    async_to_sync(scenario)()


def test_staff_socket_follows_devices_and_queue(pool, charlie, alice):
    from gpus.services import allocation_release, allocation_reserve

    async def scenario():
        ws, ok, _ = await connect("/ws/dashboard/", charlie)
        snapshot = await next_of(ws, "snapshot")
        [node] = snapshot["nodes"]
        assert node["devices"][0]["allocated_mb"] == 0
        allocation = await database_sync_to_async(allocation_reserve)(device_id=pool.pk, mb=1536)
        devices = await next_of(ws, "devices")
        assert devices["nodes"][0]["devices"][0]["allocated_mb"] == 1536
        await database_sync_to_async(allocation_release)(allocation_id=allocation.pk, reason="test")
        devices = await next_of(ws, "devices")
        assert devices["nodes"][0]["devices"][0]["allocated_mb"] == 0
        await ws.disconnect()

    async_to_sync(scenario)()


def test_events_are_coalesced_per_transaction_and_dropped_on_rollback(transactional_db, alice, charlie):
    job = Job.objects.create(user=alice, model_name="tiny.en")

    async def scenario():
        ws, ok, _ = await connect("/ws/jobs/", alice)
        await next_of(ws, "jobs")

        def burst():
            with transaction.atomic():
                for _ in range(5):
                    live.job_changed(job.pk)
            try:
                with transaction.atomic():
                    live.job_changed(job.pk)
                    raise RuntimeError("rolled back")
            except RuntimeError:
                pass

        await database_sync_to_async(burst)()
        assert (await next_of(ws, "job"))["job"]["id"] == job.pk
        assert await ws.receive_nothing(timeout=QUIET_S), "five calls in one transaction send once; a rollback sends none"
        await ws.disconnect()

    async_to_sync(scenario)()


def test_publishing_with_redis_unreachable_never_raises_and_is_bounded(db, alice, settings, caplog):
    from channels.layers import channel_layers

    job = Job.objects.create(user=alice, model_name="tiny.en")
    # A port nobody listens on: connection refused, the common "Redis is down" case.
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": ["redis://127.0.0.1:9"]}}
    }
    channel_layers.backends.clear()
    live.publishing_resume()
    try:
        with transaction.atomic():
            live.job_changed(job.pk)
            live.devices_changed()
            live.queue_changed()
        started = timezone.now()
        live._Publish("job", job.pk, alice.pk)()
        live._Publish("devices")()
        elapsed = (timezone.now() - started).total_seconds()
    finally:
        channel_layers.backends.clear()
        live.publishing_resume()
    assert "live events paused" in caplog.text
    assert elapsed < live.SEND_TIMEOUT_S + 1, "a failed send is bounded, and later ones skip during the backoff"
