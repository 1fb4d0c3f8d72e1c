"""Monitoring: Flower's address and password, stale workers and crash loops in `gpuq status`."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from app.core import keys
from app.ops.registry import call_local
from app.runtime import Runtime
from app.stack.commands import flower_command
from app.stack.flower import flower_basic_auth, flower_environment
from app.store.exits import CRASH_LOOP_EXITS, WINDOW_S, recent_exits, record_exit
from tests.support.servers import server_env, until

GPUQ = str(Path(sys.executable).parent / "gpuq")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_status(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0  # not listening yet


def test_flower_beyond_loopback_without_a_password_is_refused_naming_the_setting(settings):
    env = server_env(settings, GPUQ_FLOWER_ADDRESS="0.0.0.0")
    result = subprocess.run([GPUQ, "flower"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "GPUQ_FLOWER_BASIC_AUTH" in lines[0], result.stderr


def test_flower_on_port_from_the_procfile_asks_for_its_password(settings, tmp_path):
    port = _free_port()
    env = server_env(settings, GPUQ_FLOWER_BASIC_AUTH="ops:s3cret-pw", PORT=str(port))
    with open(tmp_path / "flower.log", "wb") as log:
        flower = subprocess.Popen([GPUQ, "flower"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        assert until(lambda: _http_status(url), 60) == 401
        assert _http_status(url, "ops:wrong") == 401
        assert _http_status(url, "ops:s3cret-pw") == 200
        cmdline = Path(f"/proc/{flower.pid}/cmdline").read_bytes()
        assert b"s3cret-pw" not in cmdline, "the password stays out of the process list"
    finally:
        os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(timeout=30)


def test_config_masks_flowers_password(settings):
    env = server_env(settings, GPUQ_FLOWER_BASIC_AUTH="ops:s3cret-pw")
    shown = subprocess.run([GPUQ, "config"], env=env, capture_output=True, text=True,
                           timeout=60).stdout
    assert json.loads(shown)["flower_basic_auth"] == "****"


def test_flower_without_a_password_set_gets_one_generated_and_kept_private(settings):
    """On loopback too: every local user can reach Flower's port."""
    assert settings.flower_basic_auth is None
    env = flower_environment(settings, {"PATH": "/usr/bin"})
    user, _, password = env["FLOWER_BASIC_AUTH"].partition(":")
    kept = settings.home / "flower.password"
    assert user == "gpuq" and len(password) >= 32 and kept.read_text().strip() == password
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert flower_environment(settings, {})["FLOWER_BASIC_AUTH"] == f"gpuq:{password}"
    assert password not in flower_command(settings), "never in the process list"
    chosen = settings.model_copy(update={"flower_basic_auth": "ops:s3cret-pw"})
    assert flower_environment(chosen, {})["FLOWER_BASIC_AUTH"] == "ops:s3cret-pw"


def test_config_shows_the_generated_secrets_only_with_show_secrets(settings):
    env = server_env(settings)
    flower_password = flower_basic_auth(settings).partition(":")[2]  # as the stack makes it

    def config(*args: str) -> str:
        return subprocess.run([GPUQ, "config", *args], env=env, capture_output=True,
                              text=True, timeout=60, check=True).stdout

    shown = json.loads(config("--show-secrets"))
    assert shown["flower_basic_auth"] == f"gpuq:{flower_password}"
    assert shown["dashboard_token"] == (settings.home / "dashboard.token").read_text().strip()
    masked = config()
    assert flower_password not in masked and shown["dashboard_token"] not in masked


def test_status_names_stale_workers_and_where_flower_and_the_dashboard_listen(settings):
    with socket.socket() as flower:  # what `gpuq flower` does first: listen on its port
        flower.bind(("127.0.0.1", 0))
        flower.listen()
        port = flower.getsockname()[1]
        rt = Runtime(settings.model_copy(update={"flower_port": port}))
        rt.redis.sadd(keys.HOSTS, "gone-host")
        rt.redis.hset(keys.host_gpus("gone-host"), "0", json.dumps({"name": "fake"}))
        rt.redis.hset(keys.host_gpus("gone-host"), "1", json.dumps({"name": "fake"}))
        rt.redis.set(keys.alive("gone-host", 1), 1, ex=30)

        out = call_local(rt, "status", {})
    gone = call_local(rt, "status", {})
    rt.close()

    assert out["stale_workers"] == ["gone-host/gpu0"]
    assert out["flower"] == f"http://127.0.0.1:{port}"
    assert out["dashboard"] == "http://127.0.0.1:5556"
    assert gone["flower"] is None, "no Flower listens there any more"


def test_a_program_is_a_crash_loop_after_enough_recent_exits(rt):
    now = 10_000.0
    record_exit(rt.redis, "h1", "old", 1, 0.5, now=now - WINDOW_S - 60)
    for i in range(CRASH_LOOP_EXITS - 1):
        record_exit(rt.redis, "h1", "flaky", 3, 0.5 * 2 ** i, now=now + i)
    before = {p["program"]: p for p in recent_exits(rt.redis, now=now + 10)}
    assert not before["flaky"]["crash_loop"]
    record_exit(rt.redis, "h1", "flaky", 3, 8.0, now=now + 11)

    after = {p["program"]: p for p in recent_exits(rt.redis, now=now + 12)}

    assert after["flaky"]["crash_loop"] and after["flaky"]["exit_code"] == 3
    assert after["flaky"]["exits_in_window"] == CRASH_LOOP_EXITS
    assert not after["old"]["crash_loop"], "exits outside the window do not count"


def test_up_reports_a_crash_loop_in_status_with_the_exit_code(settings, tmp_path):
    procfile = tmp_path / "Procfile"
    procfile.write_text("flaky: sh -c 'exit 3'\n")
    env = server_env(settings, GPUQ_FLOWER_PORT=str(_free_port()))
    with open(tmp_path / "up.log", "wb") as log:
        up = subprocess.Popen([GPUQ, "up", "--no-flower", "--procfile", str(procfile)],
                              env=env, cwd=tmp_path, start_new_session=True, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        def looping() -> dict | None:
            result = subprocess.run([GPUQ, "status", "--json"], env=env, capture_output=True,
                                    text=True, timeout=60)
            programs = json.loads(result.stdout).get("programs", []) if result.stdout else []
            return next((p for p in programs if p["program"] == "flaky" and p["crash_loop"]),
                        None)

        program = until(looping, 60, poll_s=0.5)
        assert program["host"] == "testhost" and program["exit_code"] == 3
        shown = subprocess.run([GPUQ, "status"], env=env, capture_output=True, text=True,
                               timeout=60).stdout
        assert "crash loop: testhost/flaky exited" in shown
        assert "last exit code 3" in shown
        assert "flower" not in shown, "a stack run with --no-flower has no Flower to name"
        assert "dashboard: http://" in shown
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        up.wait(timeout=60)



def test_dashboard_shows_a_crash_loop_in_its_status_api_and_gpu_page(settings, rt, local):
    from app.dashboard import create_app
    from tests.support.dashboard_http import dashboard_client

    for i in range(CRASH_LOOP_EXITS):
        record_exit(rt.redis, "testhost", "gpu", 3, 2.0 ** i)

    with dashboard_client(create_app(settings, local)) as http:
        status = http.get("/api/status").json()
        page = http.get("/partials/gpus").text

    [program] = status["programs"]
    assert program["crash_loop"] and program["program"] == "gpu"
    assert "crash loop" in page and "testhost/gpu exited 3 times" in page
