"""Helpers for the fault-injection tests: restartable clusters, private Redis and PostgreSQL, timing.

Every process started here is stopped by the test that started it, in a finally block.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import QCluster

ROOT = Path(__file__).resolve().parent.parent


def figure(name: str, **values) -> None:
    """Print one measured figure in a greppable form (docs/RELIABILITY.md is written from these)."""
    shown = " ".join(f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}" for key, value in values.items())
    print(f"\nFIGURE {name}: {shown}", flush=True)


def wait_until(predicate, *, timeout: float, what: str, every: float = 0.1, on_tick=None, log=None):
    """Poll until predicate() is truthy, calling on_tick() (e.g. a sweep) on every round."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if on_tick is not None:
            on_tick()
        value = predicate()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{log() if log else ''}")


def cluster_start(env: dict, log_path: Path, workers: int = 2) -> QCluster:
    cluster = QCluster(env, log_path, workers=workers)
    try:
        cluster.wait_ready(timeout=120)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def cluster_kill(cluster: QCluster) -> None:
    """SIGKILL the cluster's parent and every child at once (its own process group)."""
    os.killpg(cluster.proc.pid, signal.SIGKILL)
    cluster.proc.wait()


class PrivateRedis:
    """A redis-server on a unix socket in a temporary folder, restartable, without persistence."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.sock = folder / "redis.sock"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed")
        self.proc = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(self.sock), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self.answers, timeout=10, what="redis-server to answer", every=0.02)

    def answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                s.connect(str(self.sock))
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class PrivatePostgres:
    """A pgserver instance in a temporary folder (not the shared test server), restartable."""

    def __init__(self, folder: Path):
        import pgserver

        self.server = pgserver.get_server(folder / "pgdata", cleanup_mode="delete")

    def url(self, database: str) -> str:
        return self.server.get_uri(database)

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.server.get_uri(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def restart(self) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", "restart", "-m", "fast"], pgdata=self.server.pgdata, user=self.server.system_user, timeout=60)

    def stop(self) -> None:
        self.server.cleanup()


def manage(env: dict, *args: str, timeout: float = 300) -> str:
    """Run a manage.py command to completion in `env`; its output, or the test fails with it."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        pytest.fail(f"manage.py {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done.stdout


class Background:
    """A long-running manage.py command (agent, probe loop) with its output in a file."""

    def __init__(self, env: dict, log_path: Path, *args: str):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), *args],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()
