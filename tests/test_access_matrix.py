"""Access control matrix: every route, page and socket, as anonymous, alice, bob and staff charlie.

Routes are enumerated from the URL resolver and the websocket routing list, and each must be
classified below: a route added later without a class fails `test_every_route_is_classified`,
so nobody can forget to decide who may use it.

On alice's objects (job page, cancel, retry, delete, API reads and actions, downloads, socket
events) only alice and staff succeed; bob gets 404 (no hint that the job exists) and the job is
unchanged; anonymous users are sent to the login page (pages) or get 401 (API), sockets close.
"""

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.tokens import default_token_generator
from django.test import Client
from django.urls import URLResolver, get_resolver
from django.utils import timezone
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode
from rest_framework.test import APIClient

from accounts.services import token_get_or_create
from jobs import services
from jobs.models import AudioFile, Job
from tests.conftest import api_client_for
from tests.scheduling import install_model, make_job
from whisperhub.asgi import application
from whisperhub.routing import websocket_urlpatterns

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    # Three users per test: PBKDF2 at full strength would make this file mostly password hashing.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# --- Classification of every route ----------------------------------------------------------------

PUBLIC = "public"  # anyone: sign-up, login, password reset
LOGIN = "login"  # any signed-in user, about themselves only (no object ids in the URL)
STAFF = "staff"  # staff pages (staff_member_required)
API = "api"  # any token or session holder, about themselves or the shared pool
JOB = "job"  # one job by id: owner or staff only
OPENAI = "openai"  # API key only, no session
DOCS = "docs"  # the API's schema and its docs page: public, they describe the API, hold no data
METRICS = "metrics"  # open, or bearer token / staff session when WHISPERHUB_METRICS_TOKEN is set
ADMIN = "admin"  # Django admin: staff only

ROUTES = {
    "": PUBLIC,  # redirects to the job list, which asks for a login
    "accounts/signup/": PUBLIC,
    "accounts/login/": PUBLIC,
    "accounts/logout/": PUBLIC,
    "accounts/password_reset/": PUBLIC,
    "accounts/password_reset/done/": PUBLIC,
    "accounts/reset/<uidb64>/<token>/": PUBLIC,
    "accounts/reset/done/": PUBLIC,
    "accounts/profile/": LOGIN,
    "accounts/profile/token/rotate/": LOGIN,
    "accounts/password_change/": LOGIN,
    "accounts/password_change/done/": LOGIN,
    "jobs/": LOGIN,
    "jobs/new/": LOGIN,
    "jobs/<int:job_id>/": JOB,
    "jobs/<int:job_id>/cancel/": JOB,
    "jobs/<int:job_id>/retry/": JOB,
    "jobs/<int:job_id>/delete/": JOB,
    "dashboard/": STAFF,
    "dashboard/snapshot/": STAFF,
    "metrics": METRICS,
    "api/schema/": DOCS,
    "api/schema/docs/": DOCS,
    "api/me/": API,
    "api/memory_status": API,
    "api/gpus/": API,
    "api/jobs/": API,
    "api/models/": API,
    "api/jobs/<int:job_id>/": JOB,
    "api/jobs/<int:job_id>/cancel/": JOB,
    "api/jobs/<int:job_id>/retry/": JOB,
    "api/jobs/<int:job_id>/files/<int:file_id>/download": JOB,
    "v1/audio/transcriptions": OPENAI,
    "v1/audio/translations": OPENAI,
    "v1/models": OPENAI,
    "v1/models/<str:model_id>": OPENAI,
}
SOCKETS = {"ws/jobs/": "own jobs", "ws/dashboard/": STAFF}


def _walk(patterns, prefix=""):
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _walk(pattern.url_patterns, prefix + str(pattern.pattern))
        else:
            yield prefix + str(pattern.pattern)


def http_routes() -> set[str]:
    # Everything under admin/ is Django admin's own (staff only, checked by the admin site).
    return {route for route in _walk(get_resolver().url_patterns) if not route.startswith("admin/")}


def test_every_route_is_classified():
    routes = http_routes()
    assert routes - ROUTES.keys() == set(), "new routes: classify them in ROUTES and check them below"
    assert ROUTES.keys() - routes == set(), "classified routes that no longer exist"
    assert {str(p.pattern) for p in websocket_urlpatterns} == SOCKETS.keys()
    assert any(route.startswith("admin/") for route in _walk(get_resolver().url_patterns))


# --- Who is asking ---------------------------------------------------------------------------------


@pytest.fixture
def clients(alice, bob, charlie):
    """Per actor: a page client (session) and an API client (token); anonymous has neither."""
    result = {"anonymous": (Client(), APIClient())}
    for name, user in (("alice", alice), ("bob", bob), ("charlie", charlie)):
        page = Client()
        page.force_login(user)
        result[name] = (page, api_client_for(user))
    return result


def to_login(response) -> bool:
    return response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def to_admin_login(response) -> bool:
    return response.status_code == 302 and response["Location"].startswith("/admin/login/")


# --- Routes without object ids ---------------------------------------------------------------------


def test_public_pages_answer_everyone(clients, alice):
    uid = urlsafe_base64_encode(force_bytes(alice.pk))
    token = default_token_generator.make_token(alice)
    pages = {
        "": 302,
        "accounts/signup/": 200,
        "accounts/login/": 200,
        "accounts/logout/": 405,  # Django 5 logs out by POST only
        "accounts/password_reset/": 200,
        "accounts/password_reset/done/": 200,
        f"accounts/reset/{uid}/{token}/": 302,  # a valid link moves the token into the session
        "accounts/reset/done/": 200,
    }
    assert len(pages) == sum(1 for kind in ROUTES.values() if kind == PUBLIC)
    page, _ = clients["anonymous"]
    for path, status in pages.items():
        assert page.get("/" + path).status_code == status, path


LOGIN_PAGES = {
    "accounts/profile/": ("get", 200),
    "accounts/profile/token/rotate/": ("post", 302),
    "accounts/password_change/": ("get", 200),
    "accounts/password_change/done/": ("get", 200),
    "jobs/": ("get", 200),
    "jobs/new/": ("get", 200),
}


def test_login_pages_ask_anonymous_to_sign_in(clients):
    assert LOGIN_PAGES.keys() == {route for route, kind in ROUTES.items() if kind == LOGIN}
    for route, (method, status) in LOGIN_PAGES.items():
        anonymous = getattr(clients["anonymous"][0], method)("/" + route)
        assert to_login(anonymous), route
        for actor in ("alice", "bob", "charlie"):
            assert getattr(clients[actor][0], method)("/" + route).status_code == status, (actor, route)


def test_token_rotation_changes_only_ones_own_token(clients, alice, bob):
    bob_key = token_get_or_create(user=bob).key
    alice_key = token_get_or_create(user=alice).key
    clients["bob"][0].post("/accounts/profile/token/rotate/")
    assert token_get_or_create(user=alice).key == alice_key
    assert token_get_or_create(user=bob).key != bob_key


def test_job_list_page_shows_only_ones_own_jobs(clients, alice, bob):
    mine = make_job(alice, name="alice-secret-recording")
    for actor in ("bob", "charlie"):  # staff see everyone's jobs on the dashboard, not in their own list
        body = clients[actor][0].get("/jobs/").content.decode()
        assert "alice-secret-recording" not in body and f"/jobs/{mine.pk}/" not in body, actor
    assert "alice-secret-recording" in clients["alice"][0].get("/jobs/").content.decode()


def test_staff_pages_are_staff_only(clients):
    for route in ("dashboard/", "dashboard/snapshot/"):
        for actor in ("anonymous", "alice", "bob"):
            assert to_admin_login(clients[actor][0].get("/" + route)), (actor, route)
        assert clients["charlie"][0].get("/" + route).status_code == 200, route


def test_admin_is_staff_only(clients):
    for actor in ("anonymous", "alice", "bob"):
        assert to_admin_login(clients[actor][0].get("/admin/")), actor
        assert to_admin_login(clients[actor][0].get("/admin/gpus/device/")), actor
    assert clients["charlie"][0].get("/admin/").status_code == 200


API_READS = ["api/me/", "api/memory_status", "api/gpus/", "api/jobs/", "api/models/"]


def test_api_docs_are_public_and_hold_no_data(clients, alice):
    make_job(alice, name="alice-secret-recording")
    for route in ("api/schema/", "api/schema/docs/"):
        response = clients["anonymous"][0].get("/" + route)
        assert response.status_code == 200 and b"alice-secret-recording" not in response.content, route
    assert {route for route, kind in ROUTES.items() if kind == DOCS} == {"api/schema/", "api/schema/docs/"}


def test_api_reads_need_a_token_or_session(clients):
    assert set(API_READS) == {route for route, kind in ROUTES.items() if kind == API}
    for route in API_READS:
        assert clients["anonymous"][1].get("/" + route).status_code == 401, route
        for actor in ("alice", "bob", "charlie"):
            assert clients[actor][1].get("/" + route).status_code == 200, (actor, route)
            assert clients[actor][0].get("/" + route).status_code == 200, (actor, route)  # the session works too


def test_api_job_list_shows_only_ones_own_jobs(clients, alice):
    mine = make_job(alice)
    for actor in ("bob", "charlie"):
        listed = clients[actor][1].get("/api/jobs/").json()["results"]
        assert listed == [], actor
        # Asking by id does not reveal it either.
        assert clients[actor][1].get(f"/api/jobs/?id={mine.pk}").json()["results"] == [], actor
    assert [job["id"] for job in clients["alice"][1].get("/api/jobs/").json()["results"]] == [mine.pk]


def test_api_me_is_about_the_token_holder(clients, alice, bob):
    assert clients["bob"][1].get("/api/me/").json()["username"] == "bob"
    assert clients["alice"][1].get("/api/me/").json()["username"] == "alice"


def test_forged_or_foreign_tokens_are_refused(clients, alice):
    forged = APIClient()
    key = token_get_or_create(user=alice).key
    for header in (f"Token {key[:-1]}x", f"Bearer {'0' * len(key)}", "Token", f"Token {key} extra", "Basic YWxpY2U6cHc="):
        forged.credentials(HTTP_AUTHORIZATION=header)
        assert forged.get("/api/me/").status_code in (401, 403), header
        assert forged.get("/v1/models").status_code == 401, header


def test_openai_routes_need_an_api_key_not_a_session(clients):
    for route, method in (
        ("v1/audio/transcriptions", "post"),
        ("v1/audio/translations", "post"),
        ("v1/models", "get"),
        ("v1/models/whisper-1", "get"),
    ):
        response = getattr(clients["anonymous"][0], method)("/" + route)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", route
        # A signed-in browser session is not an API key.
        assert getattr(clients["alice"][0], method)("/" + route).status_code == 401, route
    assert clients["bob"][1].get("/v1/models").status_code == 200


def test_metrics_with_a_token_need_it_or_staff(clients, settings):
    settings.WHISPERHUB_METRICS_TOKEN = "scrape-secret"
    for actor in ("anonymous", "alice", "bob"):
        assert clients[actor][0].get("/metrics").status_code == 401, actor
    assert clients["anonymous"][0].get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert clients["anonymous"][0].get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret").status_code == 200
    assert clients["charlie"][0].get("/metrics").status_code == 200


# --- Alice's objects --------------------------------------------------------------------------------

RESULT = {"text": "hello world", "language": "en", "duration": 1.0, "segments": [{"id": 0, "start": 0.0, "end": 1.0, "text": " hello world"}]}


@pytest.fixture
def model(tmp_path):
    # Retry re-checks the model: any existing file makes it "installed".
    checkpoint = tmp_path / "tiny.en.pt"
    checkpoint.write_bytes(b"weights")
    return install_model(checkpoint)


def alice_job(alice, state) -> Job:
    job = make_job(alice, state=state, finished_at=timezone.now() if state in Job.FINAL_STATES else None)
    if state == Job.State.COMPLETED:
        AudioFile.objects.filter(job=job).update(state=AudioFile.State.COMPLETED, result=RESULT, text="hello world")
    return job


def snapshot(job) -> tuple | None:
    row = Job.objects.filter(pk=job.pk).values_list("state", "attempt").first()
    return row


# (name, page or api, method, path template, alice's job state before, status for owner/staff, changed?)
OBJECT_ACTIONS = [
    ("page: job", "page", "get", "/jobs/{job}/", Job.State.COMPLETED, 200, False),
    ("page: cancel", "page", "post", "/jobs/{job}/cancel/", Job.State.PENDING, 302, True),
    ("page: retry", "page", "post", "/jobs/{job}/retry/", Job.State.FAILED, 302, True),
    ("page: delete", "page", "post", "/jobs/{job}/delete/", Job.State.COMPLETED, 302, True),
    ("api: job", "api", "get", "/api/jobs/{job}/", Job.State.COMPLETED, 200, False),
    ("api: delete", "api", "delete", "/api/jobs/{job}/", Job.State.COMPLETED, 204, True),
    ("api: cancel", "api", "post", "/api/jobs/{job}/cancel/", Job.State.PENDING, 200, True),
    ("api: retry", "api", "post", "/api/jobs/{job}/retry/", Job.State.FAILED, 200, True),
    ("api: download", "api", "get", "/api/jobs/{job}/files/{file}/download?format=srt", Job.State.COMPLETED, 200, False),
]


def test_object_actions_cover_every_job_route():
    templates = {path.split("?")[0].strip("/") for _, _, _, path, *_ in OBJECT_ACTIONS}
    expected = {
        route.replace("<int:job_id>", "{job}").replace("<int:file_id>", "{file}").strip("/")
        for route, kind in ROUTES.items()
        if kind == JOB
    }
    assert templates == expected


@pytest.mark.parametrize("name,kind,method,template,state,status,changes", OBJECT_ACTIONS, ids=[a[0] for a in OBJECT_ACTIONS])
def test_only_owner_and_staff_reach_alices_job(clients, alice, model, name, kind, method, template, state, status, changes):
    client_index = 0 if kind == "page" else 1
    for actor in ("anonymous", "bob", "alice", "charlie"):
        job = alice_job(alice, state)
        path = template.format(job=job.pk, file=job.files.get().pk)
        before = snapshot(job)
        response = getattr(clients[actor][client_index], method)(path)
        if actor == "anonymous":
            assert to_login(response) if kind == "page" else response.status_code == 401, (actor, response.status_code)
            assert snapshot(job) == before
        elif actor == "bob":
            assert response.status_code == 404, (actor, response.status_code)
            assert snapshot(job) == before
            assert b"hello world" not in response.content and b"alice" not in response.content
        else:
            assert response.status_code == status, (actor, response.status_code, response.content[:300])
            assert (snapshot(job) != before) == changes, actor


def test_bob_cannot_fetch_alices_file_through_his_own_job(clients, alice, bob):
    hers = alice_job(alice, Job.State.COMPLETED)
    his = alice_job(bob, Job.State.COMPLETED)
    response = clients["bob"][1].get(f"/api/jobs/{his.pk}/files/{hers.files.get().pk}/download")
    assert response.status_code == 404 and b"hello world" not in response.content


def test_a_missing_job_looks_like_someone_elses(clients, alice):
    """404 for both: an id that exists for another user reveals nothing a missing id does not."""
    job = alice_job(alice, Job.State.COMPLETED)
    missing = clients["bob"][1].get(f"/api/jobs/{job.pk + 10_000}/")
    foreign = clients["bob"][1].get(f"/api/jobs/{job.pk}/")
    assert missing.status_code == foreign.status_code == 404
    assert missing.json() == foreign.json()


# --- Sockets ---------------------------------------------------------------------------------------


def _headers(user):
    if user is None:
        return [(b"origin", b"http://localhost")]
    client = Client()
    client.force_login(user)
    return [(b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode()), (b"origin", b"http://localhost")]


async def _open(path, user):
    headers = await database_sync_to_async(_headers)(user)
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, code = await communicator.connect(timeout=10)
    return communicator, connected, code


async def _messages(communicator, seconds=1.0) -> list[dict]:
    """Every message until none arrives for `seconds` (a receive timeout would cancel the app)."""
    found = []
    while not await communicator.receive_nothing(timeout=seconds):
        found.append(await communicator.receive_json_from())
    return found


def _mentions(messages, job_id) -> bool:
    for message in messages:
        jobs = message.get("jobs") or ([message["job"]] if "job" in message else [])
        if any(isinstance(j, dict) and j.get("id") == job_id for j in jobs) or message.get("job_id") == job_id:
            return True
    return False


@pytest.mark.django_db(transaction=True)
def test_sockets_show_alices_job_only_to_alice_and_staff(alice, bob, charlie, model):
    job = alice_job(alice, Job.State.PENDING)

    async def scenario():
        refused = {}
        for path in SOCKETS:
            _, connected, code = await _open("/" + path, None)
            refused[("anonymous", path)] = (connected, code)
        for user in (alice, bob):
            _, connected, code = await _open("/ws/dashboard/", user)
            refused[(user.username, "ws/dashboard/")] = (connected, code)
        opened = {}
        for label, path, user in (
            ("alice", "/ws/jobs/", alice),
            ("bob", "/ws/jobs/", bob),
            ("charlie", "/ws/jobs/", charlie),
            ("charlie-dashboard", "/ws/dashboard/", charlie),
        ):
            communicator, connected, _ = await _open(path, user)
            assert connected, label
            opened[label] = (communicator, [await communicator.receive_json_from(timeout=10)])  # the state on connect
        await database_sync_to_async(services.job_cancel)(job=job)  # an event about alice's job
        seen = {}
        for label, (communicator, first) in opened.items():
            seen[label] = (first, await _messages(communicator, 1.5))
            await communicator.disconnect()
        return refused, seen

    refused, seen = async_to_sync(scenario)()
    assert refused == {
        ("anonymous", "ws/jobs/"): (False, 4401),
        ("anonymous", "ws/dashboard/"): (False, 4401),
        ("alice", "ws/dashboard/"): (False, 4403),
        ("bob", "ws/dashboard/"): (False, 4403),
    }
    first, events = seen["alice"]
    assert _mentions(first, job.pk) and _mentions(events, job.pk)
    for label in ("bob", "charlie"):  # the user socket shows one's own jobs, staff included
        first, events = seen[label]
        assert not _mentions(first, job.pk) and not _mentions(events, job.pk), label
    first, events = seen["charlie-dashboard"]
    assert _mentions(events, job.pk)
