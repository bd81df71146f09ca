from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from accounts.forms import SignUpForm
from accounts.services import token_get_or_create, token_rotate, user_sign_up


def signup(request):
    if request.user.is_authenticated:
        return redirect("jobs:list")
    form = SignUpForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = user_sign_up(
            username=form.cleaned_data["username"],
            email=form.cleaned_data.get("email", ""),
            password=form.cleaned_data["password1"],
        )
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        messages.success(request, "Welcome to WhisperHub.")
        return redirect("jobs:list")
    return render(request, "accounts/signup.html", {"form": form})


@login_required
def profile(request):
    token = token_get_or_create(user=request.user)
    return render(request, "accounts/profile.html", {"token": token})


@login_required
@require_POST
def rotate_token(request):
    token_rotate(user=request.user)
    messages.success(request, "A new API token was issued; the old one no longer works.")
    return redirect("accounts:profile")
