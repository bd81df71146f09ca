"""The embedded services used when DATABASE_URL / REDIS_URL are not set.

PostgreSQL comes from the `pgserver` package (real PostgreSQL 16 binaries, data
under var/pgdata, unix socket only). Redis is Debian's `redis-server` on a unix
socket under var/, without persistence: it only carries live events.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

DATABASE_NAME = "whisperhub"
# Test runs, several workers and a web server each hold connections; the
# PostgreSQL default of 100 runs out when a developer runs the suite beside `make run`.
MAX_CONNECTIONS = 400


def _prune_dead_handles(pgdata: Path) -> None:
    """Forget pgserver handles of processes that died without deregistering.

    pgserver stops the server when the last registered process exits, but a process
    killed with SIGKILL never deregisters, and then the server is never stopped.
    Dropping dead pids at start restores the rule "stop when the last user exits".
    """
    handles = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (FileNotFoundError, ValueError):
        return
    alive = [pid for pid in pids if _pid_alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def postgres_url(var_dir: Path) -> str:
    """Start (or attach to) the embedded PostgreSQL and return a URL for our database."""
    try:
        import pgserver
        import psycopg
    except ImportError as exc:  # pragma: no cover - only without the requirements
        raise ImproperlyConfigured(f"DATABASE_URL is unset and the embedded PostgreSQL is unavailable: {exc}")

    pgdata = var_dir / "pgdata"
    pgdata.mkdir(parents=True, exist_ok=True)
    # Under pgserver's own inter-process lock: its register/deregister rewrite the same file,
    # and an unlocked rewrite here raced them (16 processes starting at once left it empty).
    from pgserver.postgres_server import PostgresServer

    with PostgresServer._lock:
        _prune_dead_handles(pgdata)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    admin_uri = server.get_uri()
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        current = int(conn.execute("SHOW max_connections").fetchone()[0])
        if current < MAX_CONNECTIONS:
            # Takes effect at the next start; restart now, once, while nobody else uses it.
            conn.execute(f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS}")
            needs_restart = True
        else:
            needs_restart = False
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE_NAME]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
    if needs_restart:
        _restart(server)
    return server.get_uri(DATABASE_NAME)


def _restart(server) -> None:
    from pgserver._commands import pg_ctl

    pg_ctl(["-w", "restart", "-m", "fast"], pgdata=server.pgdata, user=server.system_user, timeout=30)


def redis_url(var_dir: Path) -> str:
    """Start (or reuse) a private redis-server on a unix socket and return its URL."""
    sock = var_dir / "redis.sock"
    if _redis_answers(sock):
        return f"unix://{sock}"
    binary = shutil.which("redis-server")
    if binary is None:
        raise ImproperlyConfigured(
            "REDIS_URL is unset and redis-server is not installed: install Debian's redis-server "
            "(apt-get install redis-server) or set REDIS_URL"
        )
    var_dir.mkdir(parents=True, exist_ok=True)
    if sock.exists():
        sock.unlink()  # stale socket of a redis that was killed
    subprocess.run(
        [
            binary,
            "--port", "0",
            "--unixsocket", str(sock),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "yes",
            "--pidfile", str(var_dir / "redis.pid"),
            "--logfile", str(var_dir / "redis.log"),
            "--dir", str(var_dir),
        ],
        check=True,
    )
    deadline = time.monotonic() + 10
    while not _redis_answers(sock):
        if time.monotonic() > deadline:
            raise ImproperlyConfigured(f"redis-server did not start; see {var_dir / 'redis.log'}")
        time.sleep(0.05)
    return f"unix://{sock}"


def _redis_answers(sock: Path) -> bool:
    import socket

    if not sock.exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(str(sock))
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def stop_redis(var_dir: Path) -> None:
    pidfile = var_dir / "redis.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        pass
