"""First-start set-up run by `make run`: an administrator and a usable model.

Idempotent and fast on later starts: it only checks that both exist.
"""

import os
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import BaseCommand, call_command


class Command(BaseCommand):
    help = "Create the first administrator (password kept in var/admin_password) and import a model if none is installed."

    def handle(self, *args, **options):
        self.ensure_admin()
        call_command("import_model", "--if-none-installed", verbosity=options["verbosity"])

    def ensure_admin(self):
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            return
        password_file = settings.VAR_DIR / "admin_password"
        password = secrets.token_urlsafe(12)
        username = os.environ.get("WHISPERHUB_ADMIN_USER", "admin")
        User.objects.create_superuser(username=username, email="", password=password)
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
        self.stdout.write(
            self.style.SUCCESS(
                f"Created administrator '{username}' with password {password}\n"
                f"(kept in {password_file}). Log in at /admin/ or /accounts/login/."
            )
        )
