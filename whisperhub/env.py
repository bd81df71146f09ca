"""Typed environment variable readers that fail loudly.

A malformed value stops start-up with one line naming the variable (raised as
ImproperlyConfigured, which manage.py and scripts/run.py print without a traceback).
"""

import os
from urllib.parse import quote, urlencode, urlparse

from django.core.exceptions import ImproperlyConfigured


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below the minimum {minimum}")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name}={value} is above the maximum {maximum}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None, maximum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below the minimum {minimum}")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name}={value} is above the maximum {maximum}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return [part.strip() for part in raw.split(",") if part.strip()]


def env_url(name: str, schemes: tuple[str, ...]) -> str:
    """An optional URL; empty means "not configured"."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return ""
    parsed = urlparse(raw)
    if parsed.scheme not in schemes:
        raise ImproperlyConfigured(
            f"{name} must start with one of {', '.join(s + '://' for s in schemes)} (got {raw!r})"
        )
    if not (parsed.netloc or parsed.path or parsed.query):
        raise ImproperlyConfigured(f"{name}={raw!r} names no server")
    return raw


def database_url(settings_dict: dict) -> str:
    """A DATABASE_URL naming the database of a Django DATABASES entry: the inverse of what
    settings.py parses, for child processes (test and benchmark databases included)."""
    netloc = quote(settings_dict["USER"] or "", safe="")
    if settings_dict["PASSWORD"]:
        netloc += ":" + quote(settings_dict["PASSWORD"], safe="")
    netloc += "@" + (settings_dict["HOST"] or "")
    if settings_dict["PORT"]:
        netloc += f":{settings_dict['PORT']}"
    options = {k: v for k, v in settings_dict.get("OPTIONS", {}).items() if isinstance(v, (str, int))}
    query = f"?{urlencode(options)}" if options else ""
    return f"postgresql://{netloc}/{quote(settings_dict['NAME'])}{query}"
