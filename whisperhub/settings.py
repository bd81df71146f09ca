"""WhisperHub settings, read from environment variables (see README "Configuration").

Every reader in whisperhub.env fails with one clear line on a malformed value.
"""

import os
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from whisperhub import embedded
from whisperhub.env import env_bool, env_float, env_int, env_list, env_str, env_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("WHISPERHUB_VAR_DIR", str(BASE_DIR / "var"))).resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)


def _secret_key() -> str:
    given = env_str("SECRET_KEY")
    if given:
        return given
    # Generated once and kept under var/ so sessions survive restarts; never in the repository.
    path = VAR_DIR / "secret_key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI and ReDoc files served locally: the docs page works offline
    "django_q",
    "channels",
    "accounts",
    "gpus",
    "jobs",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "whisperhub.urls"
ASGI_APPLICATION = "whisperhub.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database: PostgreSQL only (row locks are the ledger's correctness argument). ---
_database_url = env_url("DATABASE_URL", ("postgres", "postgresql", "pgsql"))
if not _database_url:
    _database_url = embedded.postgres_url(VAR_DIR)
try:
    _db = dj_database_url.parse(_database_url, conn_max_age=60, conn_health_checks=True)
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL is malformed: {exc}") from None
if not _db.get("NAME"):
    raise ImproperlyConfigured("DATABASE_URL names no database")
# Several test runs may share one server (a developer beside CI); each names its own test database.
_db["TEST"] = {"NAME": env_str("WHISPERHUB_TEST_DB", f"test_{_db['NAME']}")}
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: live events only (Channels layer). ---
REDIS_URL = env_url("REDIS_URL", ("redis", "rediss", "unix")) or embedded.redis_url(VAR_DIR)
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # redis-py 8 reads with a 5 s socket timeout by default, which a consumer's idle 5 s
            # BZPOPMIN races: every quiet socket was torn down about every 5 s. Above 5, still finite.
            "hosts": [{"address": REDIS_URL, "socket_timeout": 10}],
            "prefix": env_str("WHISPERHUB_CHANNEL_PREFIX", "whisperhub"),
            "capacity": 1000,
            "expiry": 30,
        },
    }
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "jobs:list"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)  # WhiteNoise warns at every start when it is missing
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(VAR_DIR / "media"))).resolve()
MEDIA_URL = "/media/"  # never served directly: downloads go through permission-checked views

# --- Uploads ---
MAX_UPLOAD_MB = env_int("WHISPERHUB_MAX_UPLOAD_MB", 500, minimum=1)
MAX_FILES_PER_JOB = env_int("WHISPERHUB_MAX_FILES_PER_JOB", 20, minimum=1)
# Whole request body bound: all files of one job plus the form fields.
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024  # non-file fields only
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024  # larger files stream to a temp file
DATA_UPLOAD_MAX_NUMBER_FILES = MAX_FILES_PER_JOB
FILE_UPLOAD_PERMISSIONS = 0o640

# --- REST API ---
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 25,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_THROTTLE_RATES": {
        "submit": env_str("WHISPERHUB_SUBMIT_RATE", "60/hour"),
    },
}
SPECTACULAR_SETTINGS = {
    "TITLE": "WhisperHub API",
    "DESCRIPTION": "Transcription jobs scheduled onto a GPU pool through a memory-reservation ledger.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Devices and the ledger ---
WHISPERHUB_DEVICES = env_str("WHISPERHUB_DEVICES", "auto")
WHISPERHUB_CPU_MEMORY_MB = env_int("WHISPERHUB_CPU_MEMORY_MB", 0, minimum=0)  # 0: half the RAM
WHISPERHUB_NODE_NAME = env_str("WHISPERHUB_NODE_NAME", "") or os.uname().nodename
# Each node's qcluster consumes its own queue; the dispatcher routes a job's task to the queue
# of the node that holds the job's reservation (Node.cluster_name).
WHISPERHUB_CLUSTER_NAME = "whisperhub-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in WHISPERHUB_NODE_NAME)
WHISPERHUB_DEFAULT_SAFETY_FACTOR = env_float("WHISPERHUB_SAFETY_FACTOR", 0.8, minimum=0.01, maximum=1.0)
WHISPERHUB_AGENT_INTERVAL = env_float("WHISPERHUB_AGENT_INTERVAL", 3.0, minimum=0.1)
WHISPERHUB_NODE_OFFLINE_AFTER = env_float("WHISPERHUB_NODE_OFFLINE_AFTER", 30.0, minimum=1.0)
# Set: GET /metrics needs "Authorization: Bearer <token>" (or a staff session). Empty: open, like most exporters.
WHISPERHUB_METRICS_TOKEN = env_str("WHISPERHUB_METRICS_TOKEN", "")
WHISPERHUB_MODEL_DIR = Path(env_str("WHISPERHUB_MODEL_DIR", str(VAR_DIR / "models"))).resolve()
WHISPERHUB_DEFAULT_MODEL = env_str("WHISPERHUB_DEFAULT_MODEL", "tiny.en")  # what OpenAI's "whisper-1" means here

# --- django-q2: PostgreSQL (ORM broker) carries "run job N attempt K"; our dispatcher decides order. ---
WHISPERHUB_WORKERS = env_int("WHISPERHUB_WORKERS", 2, minimum=1)
WHISPERHUB_TASK_TIMEOUT = env_int("WHISPERHUB_TASK_TIMEOUT", 3600, minimum=10)
Q_CLUSTER = {
    "name": "whisperhub",
    "cluster_name": WHISPERHUB_CLUSTER_NAME,
    "orm": "default",
    "workers": WHISPERHUB_WORKERS,
    "recycle": 50,
    # q2 hands a task that outlives `retry` to a second worker: keep retry above timeout,
    # and let our own attempt counting and lease reaper bound redelivery.
    "timeout": WHISPERHUB_TASK_TIMEOUT,
    # WHISPERHUB_Q_RETRY exists for the fault tests (a task outliving retry must still run once).
    "retry": env_int("WHISPERHUB_Q_RETRY", WHISPERHUB_TASK_TIMEOUT + 120, minimum=2),
    "max_attempts": 0,
    "poll": env_float("WHISPERHUB_Q_POLL", 0.05, minimum=0.01),
    "catch_up": False,
    "save_limit": 1000,
    "ack_failures": True,
    "label": "Task queue",
}

# --- Mail (alerts) ---
EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1, maximum=65535)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "whisperhub@localhost")

# --- Security headers; cookies are Secure when served over HTTPS. ---
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
_https = env_bool("WHISPERHUB_HTTPS", False)
SESSION_COOKIE_SECURE = _https
CSRF_COOKIE_SECURE = _https
if _https:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = 31536000

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "pgserver": {"level": "WARNING"},
    },
}
