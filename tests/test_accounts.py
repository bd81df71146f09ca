import pytest
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


def test_sign_up_logs_in_and_issues_a_token(client):
    response = client.post(
        reverse("accounts:signup"),
        {"username": "dora", "email": "dora@example.com", "password1": PASSWORD, "password2": PASSWORD},
    )
    assert response.status_code == 302
    assert Token.objects.filter(user__username="dora").exists()
    assert client.get(reverse("accounts:profile")).status_code == 200


def test_sign_up_with_mismatched_passwords_is_refused(client):
    response = client.post(
        reverse("accounts:signup"),
        {"username": "dora", "password1": PASSWORD, "password2": PASSWORD + "x"},
    )
    assert response.status_code == 200
    assert "didn’t match" in response.content.decode()
    assert not Token.objects.filter(user__username="dora").exists()


def test_login_and_logout(client, alice):
    response = client.post(reverse("login"), {"username": "alice", "password": PASSWORD})
    assert response.status_code == 302
    assert client.get(reverse("accounts:profile")).status_code == 200
    client.post(reverse("logout"))
    assert client.get(reverse("accounts:profile")).status_code == 302


def test_wrong_password_does_not_log_in(client, alice):
    response = client.post(reverse("login"), {"username": "alice", "password": "nope"})
    assert response.status_code == 200
    assert client.get(reverse("accounts:profile")).status_code == 302


def test_password_change(alice_client, alice):
    response = alice_client.post(
        reverse("password_change"),
        {"old_password": PASSWORD, "new_password1": PASSWORD + "2", "new_password2": PASSWORD + "2"},
    )
    assert response.status_code == 302
    alice.refresh_from_db()
    assert alice.check_password(PASSWORD + "2")


def test_profile_shows_the_token(alice_client, alice):
    body = alice_client.get(reverse("accounts:profile")).content.decode()
    assert Token.objects.get(user=alice).key in body


def test_rotating_the_token_revokes_the_old_one(alice_client, alice):
    old = Token.objects.get(user=alice).key
    assert alice_client.post(reverse("accounts:rotate-token")).status_code == 302
    new = Token.objects.get(user=alice).key
    assert new != old

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {old}")
    assert api.get("/api/me/").status_code == 401
    api.credentials(HTTP_AUTHORIZATION=f"Token {new}")
    assert api.get("/api/me/").json()["username"] == "alice"


def test_rotation_needs_post(alice_client):
    assert alice_client.get(reverse("accounts:rotate-token")).status_code == 405


@pytest.mark.parametrize("keyword", ["Token", "Bearer"])
def test_token_and_bearer_keywords_authenticate(alice, keyword):
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"{keyword} {Token.objects.get(user=alice).key}")
    assert api.get("/api/me/").status_code == 200


@pytest.mark.parametrize(
    "header",
    [None, "Token", "Token nonsense", "Bearer 0000000000000000000000000000000000000000", "Token a b", "Basic Zm9vOmJhcg=="],
)
def test_missing_or_bad_token_gets_401(alice, header):
    api = APIClient()
    if header:
        api.credentials(HTTP_AUTHORIZATION=header)
    response = api.get("/api/me/")
    assert response.status_code == 401
    assert "detail" in response.json()


def test_ordinary_user_is_refused_admin(alice_client):
    response = alice_client.get("/admin/")
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_staff_reaches_admin(charlie_client):
    assert charlie_client.get("/admin/").status_code == 200


def test_drf_create_token_command(alice):
    from django.core.management import call_command

    Token.objects.filter(user=alice).delete()
    call_command("drf_create_token", "alice")
    assert Token.objects.filter(user=alice).exists()
