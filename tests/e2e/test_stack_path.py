"""`gpuq up` started by its path, with no venv activated and no gpuq on PATH, runs its own
gpuq for every Procfile line, and takes everything it started down with it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from app.client import Client
from app.core.settings import Settings
from tests.support.servers import until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

GPUQ = Path(sys.executable).parent / "gpuq"  # the venv's script, symlinks not resolved


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def started_from(home: Path) -> set[int]:
    """Live (not zombie) processes whose environment names this GPUQ_HOME, or that run in
    a directory under it (the embedded Redis runs in GPUQ_HOME/redis)."""
    marker = f"GPUQ_HOME={home}".encode()
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cwd = Path(os.readlink(proc / "cwd"))
            zombie = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, ValueError, IndexError):
            continue
        if (marker in environ or cwd.is_relative_to(home)) and not zombie:
            found.add(int(proc.name))
    return found


def test_gpuq_up_without_a_venv_on_path_runs_its_own_gpuq_and_stops_it_all(tmp_path: Path):
    # Given a private home, 2 fake GPUs and a PATH with no gpuq on it
    home = tmp_path / "home"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "GPUQ_HOME": str(home),
           "GPUQ_FAKE_GPUS": "2", "GPUQ_HOSTNAME": "pathtest", "GPUQ_HEARTBEAT_S": "1",
           "GPUQ_DASHBOARD_PORT": str(_free_port())}
    if "PYTHONPATH" in os.environ:  # the tree under test, when it is not the installed one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    assert subprocess.run(["sh", "-c", "command -v gpuq"], env=env).returncode != 0
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen([str(GPUQ), "up", "--no-flower"], env=env, cwd=tmp_path,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    # The stack's own embedded Redis and SQLite, whatever GPUQ_* this test process was given.
    client = Client(Settings(home=home, hostname="pathtest", fake_gpus=2, redis_url=None,
                             database_url=None, _env_file=None))
    try:
        # When it is up, then both GPU workers are alive and a job runs on one
        until(lambda: _workers_alive(client) == 2, timeout_s=180, poll_s=0.5)
        job = client.submit("true", gpus=1)
        assert job.wait(timeout_s=120) == "SUCCEEDED"
        # and no program of the Procfile exited (before the fix each exited 127)
        assert client.call("status")["programs"] == []
        started = started_from(home)
        assert len(started) >= 7, "gpuq up, Redis, control, beat, gpuq worker, 2 GPU workers"

        # When gpuq up is told to stop, then it exits and nothing it started is left
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0
        until(lambda: not started_from(home), timeout_s=60, poll_s=0.2)
    finally:
        client.close()
        _kill_all(up, home)
        print((tmp_path / "up.log").read_text(errors="replace")[-4000:])


def _workers_alive(client: Client) -> int:
    try:
        return sum(h["workers_alive"] for h in client.call("status")["hosts"])
    except Exception:  # the embedded Redis is not up yet
        return 0


def _kill_all(up: subprocess.Popen[bytes], home: Path) -> None:
    """Whatever a failed test left: its gpuq up, and every process of its home, by pid."""
    for pid in {up.pid, *started_from(home)}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        up.wait(timeout=10)
