"""Shared fixtures: three users (alice, bob and staff charlie), API clients, real speech."""

import shutil
import subprocess

import pytest
from django.test import Client
from rest_framework.test import APIClient

from accounts.services import token_get_or_create, user_sign_up

PASSWORD = "correct-horse-battery-9"


@pytest.fixture(autouse=True)
def _media_root(settings, tmp_path):
    # Uploads of one test never meet another's, nor the developer's var/media.
    settings.MEDIA_ROOT = tmp_path / "media"


@pytest.fixture
def alice(db):
    return user_sign_up(username="alice", email="alice@example.com", password=PASSWORD)


@pytest.fixture
def bob(db):
    return user_sign_up(username="bob", email="bob@example.com", password=PASSWORD)


@pytest.fixture
def charlie(db):
    """A staff member (not a superuser)."""
    user = user_sign_up(username="charlie", email="charlie@example.com", password=PASSWORD)
    user.is_staff = True
    user.save(update_fields=["is_staff"])
    return user


def api_client_for(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token_get_or_create(user=user).key}")
    return client


@pytest.fixture
def alice_api(alice):
    return api_client_for(alice)


@pytest.fixture
def bob_api(bob):
    return api_client_for(bob)


@pytest.fixture
def alice_client(alice):
    client = Client()
    client.force_login(alice)
    return client


@pytest.fixture
def charlie_client(charlie):
    client = Client()
    client.force_login(charlie)
    return client


@pytest.fixture(scope="session")
def speak(tmp_path_factory):
    """Make real speech with espeak-ng: speak("hello world") -> path of a 16 kHz mono wav."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed (make test installs it)")
    folder = tmp_path_factory.mktemp("speech")
    counter = iter(range(10**6))

    def _speak(text: str, *, voice: str = "en-us", speed: int = 150) -> "Path":  # noqa: F821
        raw = folder / f"raw{next(counter)}.wav"
        out = raw.with_name(raw.stem + "-16k.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True)
        subprocess.run(
            ["ffmpeg", "-loglevel", "error", "-y", "-i", str(raw), "-ar", "16000", "-ac", "1", str(out)], check=True
        )
        return out

    return _speak
