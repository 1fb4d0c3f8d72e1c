"""A killed embedded Redis is started again by `gpuq up`, and the stack goes on.

Real processes throughout: `gpuq up` with its embedded Redis, SQLite and one fake GPU. The
server is killed as the OOM killer would (SIGKILL): `gpuq up` starts it again on the same
port and password, from its append-only file, names the restart in `gpuq status`, and
still stops in moments. Every process the stack starts carries a marker in its environment,
so that whatever is left after the stop is found however it got there.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from app.core.settings import Settings
from app.store.embedded_redis import STATE_FILE, find_embedded
from tests.support.servers import processes_marked, server_env, until

pytestmark = pytest.mark.e2e
GPUQ = str(Path(sys.executable).parent / "gpuq")
MARK = "REDIS_RESTART_TEST_MARK"


def marked(mark: str) -> list[int]:
    """Live (not zombie) processes whose environment carries `mark`."""
    return processes_marked(MARK, mark)


def gpuq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GPUQ, *args], env=env, capture_output=True, text=True, timeout=60)


def answer(env: dict[str, str], *args: str) -> dict | None:
    """`gpuq ARGS --json` parsed, or None while the stack cannot answer."""
    result = gpuq(env, *args, "--json")
    return json.loads(result.stdout) if result.returncode == 0 else None


def submit(env: dict[str, str], *command: str) -> int | None:
    """The id of a job submitted with `gpuq submit`, or None when it was refused."""
    result = gpuq(env, "submit", "--json", "--", *command)
    return json.loads(result.stdout)["job_id"] if result.returncode == 0 else None


def job_status(env: dict[str, str], job_id: int) -> str | None:
    rows = (answer(env, "queue") or {}).get("jobs", [])
    return next((r["status"] for r in rows if r["id"] == job_id), None)


def server_pid(settings: Settings) -> int | None:
    """The embedded server's pid, as its state file (server.json) tells whoever reuses it."""
    try:
        return int(json.loads((settings.redis_dir / STATE_FILE).read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def answers(url: str) -> bool:
    try:
        with contextlib.closing(redis.Redis.from_url(url, socket_connect_timeout=1)) as r:
            return bool(r.ping())
    except redis.RedisError:
        return False


@pytest.mark.timeout(400)
def test_a_killed_embedded_redis_is_started_again_and_the_stack_works_and_stops(tmp_path):
    settings = Settings(home=tmp_path / "home", redis_url=None, database_url=None,
                        hostname="redis-killed", fake_gpus=1, cpu_slots=0, heartbeat_s=1,
                        kill_grace_s=1, _env_file=None)
    mark = uuid.uuid4().hex
    env = server_env(settings, **{MARK: mark})
    procfile = tmp_path / "Procfile"
    procfile.write_text("control: gpuq control-worker\nbeat: gpuq beat\ngpu: gpuq worker\n")
    with open(tmp_path / "up.log", "ab") as out:
        up = subprocess.Popen([GPUQ, "up", "--procfile", str(procfile)], env=env,
                              cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        until(lambda: sum(h["workers_alive"] for h in (answer(env, "status") or {}).get(
            "hosts", [])) == 1, 180, poll_s=1)
        url = find_embedded(settings)
        assert url is not None
        accepted = submit(env, "sleep", "2")
        assert accepted is not None
        with contextlib.closing(redis.Redis.from_url(url)) as r:
            r.set("written-before-the-kill", "1")
        first_pid = server_pid(settings)
        assert first_pid is not None

        os.kill(first_pid, signal.SIGKILL)
        until(lambda: server_pid(settings) not in (None, first_pid) and answers(url), 60,
              describe=lambda: f"pid file {server_pid(settings)}, up.log: "
                               f"{(tmp_path / 'up.log').read_text()[-2000:]}")
        assert find_embedded(settings) == url, "the same port and password"
        with contextlib.closing(redis.Redis.from_url(url)) as r:
            assert r.get("written-before-the-kill") == b"1", "read back from its AOF"

        after = until(lambda: submit(env, "true"), 60)
        until(lambda: job_status(env, after) == "SUCCEEDED", 120, poll_s=1,
              describe=lambda: job_status(env, after))
        assert until(lambda: job_status(env, accepted) == "SUCCEEDED", 120, poll_s=1,
                     describe=lambda: job_status(env, accepted))
        programs = until(lambda: [p for p in (answer(env, "status") or {}).get(
            "programs", []) if p["program"] == "redis"], 30)
        assert programs[0]["exits"] == 1 and programs[0]["exit_code"] == -signal.SIGKILL
        shown = gpuq(env, "status").stdout
        assert "redis-killed/redis exited 1 times" in shown, shown

        up.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        until(lambda: up.poll() is not None, 40, poll_s=0.2)
        stopped_s = time.monotonic() - stopping
        assert until(lambda: not marked(mark), 10), [
            Path(f"/proc/{p}/cmdline").read_bytes() for p in marked(mark)]
        print(f"stopped in {stopped_s:.1f}s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(up.pid, signal.SIGKILL)
        up.wait()
        for pid in marked(mark):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
