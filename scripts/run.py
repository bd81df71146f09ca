#!/usr/bin/env python
"""Start WhisperHub on this machine: database, Redis, web server, task cluster, GPU agent.

`make run` calls this. It holds an exclusive lock on var/run.lock (released by the
kernel even when this process is SIGKILLed, so a crash never blocks the next start),
starts the embedded PostgreSQL and Redis when DATABASE_URL / REDIS_URL are unset,
migrates, creates the first administrator, and supervises the three processes,
restarting one that dies. Ctrl-C stops them all.
"""

import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "whisperhub.settings")

from django.core.exceptions import ImproperlyConfigured  # noqa: E402

from whisperhub import embedded  # noqa: E402
from whisperhub.env import env_int, env_str, env_url  # noqa: E402

STOP_GRACE_S = 20


def fail(message: str) -> "NoReturn":  # noqa: F821
    print(f"whisperhub: {message}", file=sys.stderr)
    sys.exit(2)


def acquire_lock(var_dir: Path):
    lock = open(var_dir / "run.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "?"
        fail(f"WhisperHub is already running from {ROOT} (pid {pid}); stop it first (Ctrl-C in its terminal).")
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def manage(*args: str, env: dict) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], env=env, cwd=ROOT)
    if result.returncode != 0:
        fail(f"'manage.py {' '.join(args)}' failed (exit {result.returncode})")


def _die_with_parent() -> None:
    """Linux: SIGTERM the child when the supervisor dies, even by SIGKILL.

    Without it a killed `make run` leaves a web server holding the port and workers
    holding jobs, and the next start cannot bind.
    """
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervised:
    def __init__(self, name: str, argv: list[str], env: dict):
        self.name, self.argv, self.env = name, argv, env
        self.proc: subprocess.Popen | None = None
        self.restarts: list[float] = []

    def start(self) -> None:
        # A session of its own: the terminal's Ctrl-C reaches only the supervisor,
        # which then stops the children in order.
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=ROOT, start_new_session=True, preexec_fn=_die_with_parent
        )

    def check(self) -> None:
        if self.proc is None or self.proc.poll() is None:
            return
        code = self.proc.returncode
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < 60] + [now]
        if len(self.restarts) > 5:
            raise RuntimeError(f"{self.name} keeps exiting (last exit {code}); giving up")
        print(f"whisperhub: {self.name} exited with {code}; restarting", file=sys.stderr)
        time.sleep(min(2 ** len(self.restarts) / 4, 5))
        self.start()

    def terminate(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def wait_or_kill(self, deadline: float) -> None:
        if not self.proc:
            return
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def main() -> None:
    try:
        port = env_int("PORT", 8000, minimum=1, maximum=65535)
        host = env_str("HOST", "127.0.0.1")
        database_url = env_url("DATABASE_URL", ("postgres", "postgresql", "pgsql"))
        redis_url = env_url("REDIS_URL", ("redis", "rediss", "unix"))
    except ImproperlyConfigured as exc:
        fail(str(exc))

    var_dir = Path(env_str("WHISPERHUB_VAR_DIR", str(ROOT / "var"))).resolve()
    var_dir.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(var_dir)  # noqa: F841  (held for the life of this process)

    env = dict(os.environ)
    started_redis = False
    try:
        if not database_url:
            # This process holds the embedded server; children connect through its socket.
            env["DATABASE_URL"] = embedded.postgres_url(var_dir)
        if not redis_url:
            env["REDIS_URL"] = embedded.redis_url(var_dir)
            started_redis = True
    except ImproperlyConfigured as exc:
        fail(str(exc))

    manage("migrate", "--noinput", "-v", "0", env=env)
    manage("bootstrap", env=env)

    python = sys.executable
    children = [
        Supervised("web", [python, "-m", "daphne", "-b", host, "-p", str(port), "whisperhub.asgi:application"], env),
        Supervised("worker", [python, str(ROOT / "manage.py"), "qcluster"], env),
        Supervised("agent", [python, str(ROOT / "manage.py"), "gpu_agent"], env),
    ]
    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    for child in children:
        child.start()
    print(f"WhisperHub is running at http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
    try:
        while not stopping:
            for child in children:
                child.check()
            time.sleep(0.5)
    except RuntimeError as exc:
        print(f"whisperhub: {exc}", file=sys.stderr)
    finally:
        print("whisperhub: stopping…", flush=True)
        for child in children:
            child.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for child in children:
            child.wait_or_kill(deadline)
        if started_redis:
            embedded.stop_redis(var_dir)
        # The embedded PostgreSQL stops when this, its last user, exits (pgserver's atexit).
    print("whisperhub: stopped.")


if __name__ == "__main__":
    main()
