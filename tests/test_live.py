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
from django.db import connections, transaction
from django.test import Client
from django.utils import timezone

from gpus.models import Device, Node
from jobs import services as job_services
from jobs.models import Job
from tests.portal_fixtures import daphne  # noqa: F401  (Daphne on the test database)
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


# --- alert rules ----------------------------------------------------------------------------------

T0 = timezone.now().replace(microsecond=0) + timedelta(days=1)  # controlled time, clear of real rows


def make_pending(user, n: int) -> list[Job]:
    return [Job.objects.create(user=user, model_name="tiny.en") for _ in range(n)]


@pytest.fixture
def queue_rule(db):
    from gpus.models import AlertRule

    AlertRule.objects.update(enabled=False)  # the seeded rules stay out of these tests
    return AlertRule.objects.create(name="Queue over 2", metric="queue_length", comparison="gt", threshold=2, duration_s=300)


def evaluate(at_s: float):
    from gpus.alerts import alerts_evaluate

    return alerts_evaluate(now=T0 + timedelta(seconds=at_s))


def test_alert_fires_only_after_the_whole_duration_then_resolves(queue_rule, alice, charlie, mailoutbox):
    from gpus.models import Alert

    jobs = make_pending(alice, 3)
    for second in (0, 60, 120, 180, 240, 299):
        assert evaluate(second) == [], f"fired after {second} s of a 300 s rule"
    assert mailoutbox == []
    [fired] = evaluate(300)
    assert (fired.event, fired.value) == ("fired", 3)
    alert = Alert.objects.get()
    assert (alert.state, alert.started_at, alert.fired_at) == ("firing", T0, T0 + timedelta(seconds=300))
    assert len(mailoutbox) == 1 and mailoutbox[0].to == ["charlie@example.com"]  # no recipients set: staff
    assert "Queue over 2" in mailoutbox[0].subject
    for second in (360, 420):
        assert evaluate(second) == []
    assert len(mailoutbox) == 1, "one notification per firing"

    Job.objects.filter(pk=jobs[0].pk).update(state=Job.State.CANCELLED)
    [resolved] = evaluate(480)
    assert (resolved.event, resolved.value) == ("resolved", 2)
    alert.refresh_from_db()
    assert (alert.state, alert.resolved_at) == ("resolved", T0 + timedelta(seconds=480))
    assert len(mailoutbox) == 2 and "resolved" in mailoutbox[1].subject
    assert [(n["channel"], n["event"], n["status"]) for n in alert.notifications] == [
        ("email", "fired", "sent"),
        ("email", "resolved", "sent"),
    ]
    assert evaluate(540) == [] and len(mailoutbox) == 2


def test_a_break_in_the_condition_restarts_the_duration(queue_rule, alice):
    jobs = make_pending(alice, 3)
    for second in (0, 60, 120, 180, 240):
        assert evaluate(second) == []
    Job.objects.filter(pk=jobs[0].pk).update(state=Job.State.CANCELLED)
    assert evaluate(250) == []
    Job.objects.filter(pk=jobs[0].pk).update(state=Job.State.PENDING)
    for second in (260, 320, 380, 440, 500):
        assert evaluate(second) == [], "the stretch restarted at 260 s"
    assert [c.event for c in evaluate(560)] == ["fired"]


def test_a_gap_in_evaluation_does_not_count_as_holding(queue_rule, alice):
    make_pending(alice, 3)
    assert evaluate(0) == []
    assert evaluate(400) == [], "nobody looked between 0 and 400 s"
    for second in (460, 520, 580, 640, 699):
        assert evaluate(second) == [], "the stretch restarted at 400 s"
    assert [c.event for c in evaluate(700)] == ["fired"]


def test_disabling_a_firing_rule_resolves_it(queue_rule, alice):
    make_pending(alice, 3)
    queue_rule.duration_s = 0
    queue_rule.save()
    assert [c.event for c in evaluate(0)] == ["fired"]
    queue_rule.enabled = False
    queue_rule.save()
    assert [c.event for c in evaluate(60)] == ["resolved"]


class Receiver:
    """A real local HTTP server answering POSTs with the given status codes in turn."""

    def __init__(self, statuses):
        import http.server
        import threading

        self.statuses, self.bodies = list(statuses), []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                receiver.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                code = receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(
    "statuses, outcome, attempts",
    [([500], "failed", 4), ([503, 502, 200], "sent", 3)],
    ids=["always-failing", "recovers"],
)
def test_webhook_is_delivered_by_a_task_with_retries_and_recorded(
    queue_rule, alice, monkeypatch, django_capture_on_commit_callbacks, statuses, outcome, attempts
):
    import json

    from django_q.models import OrmQ

    from gpus import alerts
    from gpus.models import Alert

    monkeypatch.setattr(alerts, "WEBHOOK_BACKOFF_S", (0.01, 0.02, 0.04))
    receiver = Receiver(statuses)
    try:
        queue_rule.webhook_url, queue_rule.duration_s = receiver.url, 0
        queue_rule.save()
        make_pending(alice, 3)
        with django_capture_on_commit_callbacks(execute=True):
            [fired] = evaluate(0)
        # The evaluator only enqueued the delivery: the receiver has not been called yet.
        assert receiver.bodies == []
        assert OrmQ.objects.count() == 1
        alert = Alert.objects.get()
        assert {"channel": "webhook", "event": "fired", "status": "queued", "attempts": 0} in alert.notifications

        # What the q2 worker runs for that queue entry.
        assert alerts.alert_webhook_deliver(alert.pk, "fired") is (outcome == "sent")
        assert len(receiver.bodies) == attempts
        assert json.loads(receiver.bodies[0])["rule"] == "Queue over 2"
        alert.refresh_from_db()
        [entry] = [n for n in alert.notifications if n["channel"] == "webhook"]
        assert (entry["status"], entry["attempts"]) == (outcome, attempts)
    finally:
        receiver.close()


def test_webhook_to_nowhere_fails_after_retries_and_is_recorded(queue_rule, alice, monkeypatch):
    from gpus import alerts
    from gpus.models import Alert

    monkeypatch.setattr(alerts, "WEBHOOK_BACKOFF_S", (0.01, 0.01, 0.01))
    queue_rule.webhook_url, queue_rule.duration_s = "http://127.0.0.1:9/hook", 0
    queue_rule.save()
    make_pending(alice, 3)
    evaluate(0)
    alert = Alert.objects.get()
    assert alerts.alert_webhook_deliver(alert.pk, "fired") is False
    alert.refresh_from_db()
    [entry] = [n for n in alert.notifications if n["channel"] == "webhook"]
    assert entry["status"] == "failed" and entry["attempts"] == 4 and entry["errors"][0] == "ConnectionError"


def test_evaluate_due_runs_once_per_interval_and_records_a_sample(queue_rule, alice):
    from gpus.alerts import evaluate_due
    from gpus.models import MetricSample

    make_pending(alice, 4)
    evaluate_due(now=T0)
    evaluate_due(now=T0 + timedelta(seconds=3))  # another agent, 3 s later: not due
    evaluate_due(now=T0 + timedelta(seconds=11))
    assert list(MetricSample.objects.values_list("queue_length", flat=True)) == [4, 4]


def test_the_gpu_agent_loop_runs_the_evaluator(db, alice):
    from gpus.agent import Agent
    from gpus.backends import SimulatedBackend
    from gpus.models import Alert, AlertRule, MetricSample

    AlertRule.objects.update(enabled=False)
    AlertRule.objects.create(name="Any queue", metric="queue_length", comparison="ge", threshold=1, duration_s=0)
    make_pending(alice, 1)
    Agent(backend=SimulatedBackend(node_name="n-alerts", totals_mb=[4096]), node_name="n-alerts").run_once()
    assert MetricSample.objects.count() == 1
    assert Alert.objects.get().state == Alert.State.FIRING


def test_seeded_rules_are_the_seeds_defaults(db):
    import importlib

    from django.apps import apps

    from gpus.models import AlertRule

    AlertRule.objects.all().delete()
    importlib.import_module("gpus.migrations.0004_alert_rule_defaults").add_rules(apps, None)
    assert set(AlertRule.objects.values_list("metric", "comparison", "threshold", "duration_s", "enabled")) == {
        ("memory_usage", "gt", 0.9, 300, True),
        ("queue_length", "gt", 10, 600, True),
        ("error_rate", "gt", 0.1, 300, True),
    }


@pytest.mark.parametrize(
    "change, field",
    [
        ({"metric": "gpu_happiness"}, "metric"),
        ({"duration_s": "-5"}, "duration_s"),
        ({"threshold": "1.5"}, "threshold"),  # a ratio above 1 can never be reached
        ({"email_recipients": "ops@example.com, not-an-address"}, "email_recipients"),
    ],
)
def test_admin_refuses_a_malformed_rule(admin_client, change, field):
    from gpus.models import AlertRule

    form = {"name": "Bad", "enabled": "on", "metric": "memory_usage", "comparison": "gt", "threshold": "0.8",
            "duration_s": "60", "email_recipients": "", "webhook_url": "", **change}
    response = admin_client.post("/admin/gpus/alertrule/add/", form)
    assert response.status_code == 200
    assert field in response.context["adminform"].form.errors
    assert not AlertRule.objects.filter(name="Bad").exists()


def test_admin_accepts_a_good_rule_and_model_validation_refuses_bad_ones(admin_client):
    from django.core.exceptions import ValidationError

    from gpus.models import AlertRule

    form = {"name": "Hot", "enabled": "on", "metric": "temperature", "comparison": "ge", "threshold": "85",
            "duration_s": "120", "email_recipients": "ops@example.com", "webhook_url": ""}
    assert admin_client.post("/admin/gpus/alertrule/add/", form).status_code == 302
    assert AlertRule.objects.filter(name="Hot", threshold=85).exists()
    with pytest.raises(ValidationError) as refused:
        AlertRule(name="x", metric="nope", comparison="gt", threshold=1, duration_s=-1).full_clean()
    assert {"metric", "duration_s"} <= set(refused.value.message_dict)


# --- /metrics and the dashboard snapshot ------------------------------------------------------------


def test_metrics_parse_and_carry_the_figures(db, alice, client, settings):
    from prometheus_client.parser import text_string_to_metric_families

    from gpus.services import allocation_reserve

    settings.WHISPERHUB_NODE_OFFLINE_AFTER = 3600.0
    node = Node.objects.create(name="n1", cluster_name="c", last_seen=timezone.now())
    device = Device.objects.create(node=node, index=0, uuid="m-0", name="Sim", kind="simulated", total_mb=10000,
                                   reserved_mb=1000, safety_factor=0.8, used_mb=2500, temperature_c=61, utilization_pct=40)
    allocation_reserve(device_id=device.pk, mb=1800)
    now = timezone.now()
    make_pending(alice, 2)
    Job.objects.create(user=alice, model_name="tiny.en", state="completed", attempt=1,
                       started_at=now - timedelta(seconds=20), finished_at=now)
    Job.objects.create(user=alice, model_name="tiny.en", state="failed", attempt=3,
                       started_at=now - timedelta(seconds=5), finished_at=now)

    response = client.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    dev = (("device", "n1:0"), ("kind", "simulated"), ("name", "Sim"), ("node", "n1"))
    mib = 1024 * 1024
    assert samples[("whisperhub_device_memory_total_bytes", dev)] == 10000 * mib
    assert samples[("whisperhub_device_memory_allocatable_bytes", dev)] == 7200 * mib
    assert samples[("whisperhub_device_memory_allocated_bytes", dev)] == 1800 * mib
    assert samples[("whisperhub_device_memory_available_bytes", dev)] == 5400 * mib
    assert samples[("whisperhub_device_memory_driver_used_bytes", dev)] == 2500 * mib
    assert samples[("whisperhub_device_memory_usage_ratio", dev)] == 0.25
    assert samples[("whisperhub_device_temperature_celsius", dev)] == 61
    assert samples[("whisperhub_node_online", (("node", "n1"),))] == 1
    assert samples[("whisperhub_queue_length", ())] == 2
    assert samples[("whisperhub_jobs", (("state", "failed"),))] == 1
    assert samples[("whisperhub_job_processing_seconds_bucket", (("le", "10.0"),))] == 0
    assert samples[("whisperhub_job_processing_seconds_bucket", (("le", "30.0"),))] == 1
    assert samples[("whisperhub_job_processing_seconds_count", ())] == 1
    assert samples[("whisperhub_job_retries_total", ())] == 2
    assert samples[("whisperhub_job_error_ratio", (("window", "15m"),))] == 0.5

    settings.WHISPERHUB_METRICS_TOKEN = "s3cret"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret").status_code == 200


def test_snapshot_with_no_devices(charlie_client):
    body = charlie_client.get("/dashboard/snapshot/").json()
    assert body["nodes"] == [] and body["queue"] == {"count": 0, "jobs": []} and body["running"]["count"] == 0
    page = charlie_client.get("/dashboard/")
    assert page.status_code == 200 and b"dashboard.js" in page.content


def test_dashboard_is_staff_only(alice_client, client):
    for url in ("/dashboard/", "/dashboard/snapshot/"):
        assert alice_client.get(url).status_code == 302
        assert client.get(url).status_code == 302


def test_snapshot_with_an_offline_node_and_hundreds_queued(charlie_client, alice, settings):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from gpus.dashboard import QUEUE_SHOWN

    old = timezone.now() - timedelta(seconds=settings.WHISPERHUB_NODE_OFFLINE_AFTER + 60)
    node = Node.objects.create(name="gone", cluster_name="c", last_seen=old)
    Device.objects.create(node=node, index=0, uuid="g-0", name="Sim", kind="simulated", total_mb=4096)
    make_pending(alice, 10)
    with CaptureQueriesContext(connection) as few:
        body = charlie_client.get("/dashboard/snapshot/").json()
    assert body["nodes"][0]["online"] is False and body["nodes"][0]["devices"][0]["total_mb"] == 4096
    Job.objects.bulk_create([Job(user=alice, model_name="tiny.en") for _ in range(290)])
    with CaptureQueriesContext(connection) as many:
        body = charlie_client.get("/dashboard/snapshot/").json()
    assert body["queue"]["count"] == 300 and len(body["queue"]["jobs"]) == QUEUE_SHOWN
    assert [j["position"] for j in body["queue"]["jobs"][:3]] == [1, 2, 3]
    assert len(many) == len(few), "queries do not grow with the queue"


# --- a real browser on a real Daphne ------------------------------------------------------------------

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture
def browser(daphne, monkeypatch):
    """Headless Chromium; browser.page_for(user, path) opens a page logged in as that user."""
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop on this thread; the test's own ORM calls are
    # still plain synchronous code, which Django would otherwise refuse next to a loop.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    errors = []

    def page_for(user, path: str):
        client = Client()
        client.force_login(user)
        context = chromium.new_context()
        context.add_cookies([{"name": "sessionid", "value": client.cookies["sessionid"].value, "url": daphne}])
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(daphne + path)
        page.evaluate("window.__sameDocument = true")  # survives only if the page is never reloaded
        return page

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        chromium.page_for = page_for
        try:
            yield chromium
            assert errors == [], f"JavaScript errors: {errors}"
        finally:
            chromium.close()
            # Inside sync_playwright the test ran in another context, hence on its own database
            # connection: close it here, or it outlives the test and blocks dropping the test database.
            connections.close_all()


@pytest.fixture
def browser_page(browser, charlie):
    """The dashboard, open in Chromium as charlie (staff), its socket live."""
    page = browser.page_for(charlie, "/dashboard/")
    page.wait_for_selector('#dashboard[data-connection="live"]', timeout=15000)
    return page


def card_allocated(page, device) -> str:
    return page.get_attribute(f'[data-device-id="{device.pk}"]', "data-allocated-mb")


def wait_for(page, js: str, arg, what: str, timeout_ms: int = 15000) -> None:
    try:
        page.wait_for_function(js, arg=arg, timeout=timeout_ms)
    except Exception as exc:  # noqa: BLE001 - say what the page showed instead
        raise AssertionError(f"{what}; the page showed: {page.inner_text('#dashboard')[:1500]}") from exc


ALLOCATED_IS = "([id, mb]) => document.querySelector(`[data-device-id=\"${id}\"]`)?.dataset.allocatedMb === String(mb)"
PROGRESS_IS = ("([id, text]) => document.querySelector(`#running tr[data-job-id=\"${id}\"] "
               "[data-role=\"progress-text\"]`)?.textContent === text")
NOT_RUNNING = "(id) => !document.querySelector(`#running tr[data-job-id=\"${id}\"]`)"


@pytest.mark.browser
def test_dashboard_follows_a_job_live_in_a_real_browser(pool, tiny_model, speak, alice, browser_page):
    """Driven through the services (placement by the real dispatcher, progress and completion as
    the executor reports them), the open page changes without a reload and returns when the job ends.
    (browser_page comes last: the page opens once the device exists, as a staff member would see it.)"""
    page = browser_page
    assert card_allocated(page, pool) == "0"
    alice_client = Client()
    alice_client.force_login(alice)
    wav = SimpleUploadedFile("clip.wav", speak("hello from the browser test").read_bytes(), content_type="audio/wav")
    response = alice_client.post("/jobs/new/", {"files": [wav], "model": "tiny.en", "task": "transcribe", "priority": "normal"})
    assert response.status_code == 302, response.content[:500]
    job = Job.objects.get(user=alice)
    assert job.state == Job.State.LOADING and job.memory_mb == 1536

    wait_for(page, ALLOCATED_IS, [pool.pk, 1536], "the device card shows the job's reservation")
    start_processing(job, 0.3)
    wait_for(page, PROGRESS_IS, [job.pk, "30%"], "the running job's progress shows 30%")
    report_progress(job, 0.8)
    wait_for(page, PROGRESS_IS, [job.pk, "80%"], "the running job's progress moves to 80%")
    job.refresh_from_db()
    assert job_services.job_complete(job_id=job.pk, attempt=job.attempt, transcribe_seconds=1.0) is not None
    wait_for(page, ALLOCATED_IS, [pool.pk, 0], "the reservation is gone from the card")
    wait_for(page, NOT_RUNNING, job.pk, "the job left the running list")
    assert page.evaluate("window.__sameDocument") is True, "no reload happened"


RECORD_JS = """(deviceId) => {
  // Everything the page showed, sampled every 25 ms: what a person watching would have seen.
  window.__seen = { allocated: [], running: [] };
  setInterval(() => {
    const card = document.querySelector(`[data-device-id="${deviceId}"]`);
    if (card) window.__seen.allocated.push(card.dataset.allocatedMb);
    document.querySelectorAll("#running tr[data-job-id]").forEach((tr) => {
      window.__seen.running.push(tr.dataset.jobId + " " + tr.querySelector('[data-role="state"]').textContent
        + " " + tr.querySelector('[data-role="progress-text"]').textContent);
    });
  }, 25);
}"""


@pytest.mark.browser
@pytest.mark.qcluster
def test_dashboard_follows_a_real_transcription_in_a_real_browser(pool, tiny_model, request, speak, alice):
    """The whole pipeline: alice submits through the portal, the real qcluster transcribes with
    tiny.en, and the staff page open all along shows the reservation and the job, then their end."""
    import time

    tiny_model.preload = True  # the workers load it at start, so the job runs in seconds
    tiny_model.save(update_fields=["preload"])
    cluster = request.getfixturevalue("qcluster")
    page = request.getfixturevalue("browser_page")
    page.evaluate(RECORD_JS, pool.pk)

    alice_client = Client()
    alice_client.force_login(alice)
    # Two files: whisper counts progress in 30 s windows, so a short clip jumps from 0 to 100 %;
    # a job of two files shows its progress move when the first one is done.
    wavs = [
        SimpleUploadedFile(f"fox{i}.wav", speak(text).read_bytes(), content_type="audio/wav")
        for i, text in enumerate(["the quick brown fox jumps over the lazy dog", "and then it runs far away into the forest"])
    ]
    response = alice_client.post("/jobs/new/", {"files": wavs, "model": "tiny.en", "task": "transcribe", "priority": "normal"})
    assert response.status_code == 302, response.content[:500]
    job = Job.objects.get(user=alice)

    deadline = time.monotonic() + 120
    while Job.objects.get(pk=job.pk).state not in Job.FINAL_STATES:
        assert time.monotonic() < deadline, f"job did not finish:\n{cluster.output()[-3000:]}"
        page.wait_for_timeout(100)  # lets the page (and this process's live sends) run meanwhile
    job.refresh_from_db()
    assert job.state == Job.State.COMPLETED, job.error

    wait_for(page, ALLOCATED_IS, [pool.pk, 0], "the reservation is gone from the card")
    wait_for(page, NOT_RUNNING, job.pk, "the job left the running list")
    seen = page.evaluate("window.__seen")
    assert "1536" in seen["allocated"], "the card showed the job's 1.5 GiB reservation while it ran"
    shown = [line for line in seen["running"] if line.startswith(f"{job.pk} ")]
    assert shown, "the job appeared among the running jobs"
    assert any(" processing " in line for line in shown), f"the job's stage was shown: {sorted(set(shown))}"
    progress = {line.rsplit(" ", 1)[1] for line in shown}
    assert progress - {"0%"}, f"the job's progress moved on the page: {sorted(set(shown))}"
    assert page.evaluate("window.__sameDocument") is True, "no reload happened"


@pytest.mark.browser
def test_job_list_and_job_page_update_live_for_their_owner(browser, submit, alice):
    job = submit(alice)
    detail = browser.page_for(alice, f"/jobs/{job.pk}/")
    listing = browser.page_for(alice, "/jobs/")
    for page in (detail, listing):
        page.wait_for_function("window.jobSocketConnected === true", timeout=15000)
    start_processing(job, 0.4)
    detail.wait_for_function(
        "document.querySelector('#job [data-role=\"progress\"]').title === '40%'", timeout=10000
    )
    listing.wait_for_function(
        f"document.querySelector('#job-list tr[data-job-id=\"{job.pk}\"]').dataset.state === 'processing'", timeout=10000
    )
    for page in (detail, listing):
        assert page.evaluate("window.__sameDocument") is True, "updated by the socket, not by a reload"
