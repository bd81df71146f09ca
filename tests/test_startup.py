"""Start-up: bad settings stop with one line, a second start is refused, a crash recovers.

These run the real scripts/run.py and manage.py as subprocesses, the way `make run` does.
"""

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from whisperhub.embedded import _prune_dead_handles

ROOT = Path(__file__).resolve().parent.parent


def run(argv, env_extra, timeout=60):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PORT", "DJANGO_SETTINGS_MODULE")}
    env.update(env_extra)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "url, expected",
    [
        ("mysql://u:p@localhost/db", "DATABASE_URL must start with"),
        ("not a url", "DATABASE_URL must start with"),
        ("postgres://", "names no server"),
    ],
)
def test_malformed_database_url_stops_with_one_line(url, expected):
    result = run([sys.executable, "manage.py", "check"], {"DATABASE_URL": url})
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("port", ["abc", "0", "70000", "8000x"])
def test_malformed_port_stops_run_with_one_line(port, tmp_path):
    result = run([sys.executable, "scripts/run.py"], {"PORT": port, "WHISPERHUB_VAR_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "PORT" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "pgdata").exists()  # refused before touching anything


def test_second_run_is_refused_while_one_runs(tmp_path):
    with open(tmp_path / "run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("12345")
        lock.flush()
        result = run([sys.executable, "scripts/run.py"], {"WHISPERHUB_VAR_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "already running" in result.stderr
    assert not (tmp_path / "pgdata").exists()


def test_dead_pgserver_handles_are_pruned(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    handles = tmp_path / ".handle_pids.json"
    handles.write_text(json.dumps([os.getpid(), dead.pid]))
    _prune_dead_handles(tmp_path)
    assert json.loads(handles.read_text()) == [os.getpid()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def _start(var_dir: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE")}
    env.update({"WHISPERHUB_VAR_DIR": str(var_dir), "PORT": str(port), "WHISPERHUB_DEVICES": "sim:4096"})
    return subprocess.Popen(
        [sys.executable, "scripts/run.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.timeout(300)
def test_run_starts_everything_survives_sigkill_and_stops_on_ctrl_c(tmp_path):
    """A whole `make run` in a fresh var/: first start, SIGKILL crash, restart, Ctrl-C."""
    var_dir = tmp_path / "var"
    port = _free_port()
    first = _start(var_dir, port)
    try:
        assert _wait_http(f"http://127.0.0.1:{port}/accounts/login/", 150) == 200
        assert (var_dir / "admin_password").exists()
        # A crash: the supervisor dies without cleaning up; its children follow it (PDEATHSIG),
        # the embedded PostgreSQL keeps running with a stale handle.
        first.send_signal(signal.SIGKILL)
        first.wait()
        output = first.stdout.read()
        assert "Created administrator 'admin'" in output
        second = _start(var_dir, port)
        try:
            assert _wait_http(f"http://127.0.0.1:{port}/accounts/login/", 120) == 200
            second.send_signal(signal.SIGINT)
            assert second.wait(timeout=60) == 0
            tail = second.stdout.read()
            assert "stopped." in tail
            assert "Created administrator" not in tail  # data kept: the admin exists already
        finally:
            if second.poll() is None:
                second.kill()
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/accounts/login/", timeout=2)
    finally:
        if first.poll() is None:
            first.kill()
