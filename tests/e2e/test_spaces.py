"""A GPUQ_HOME or an interpreter path with a space in it: every server command line gpuq
builds keeps such a path one word, and `gpuq up` runs a job there."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.settings import Settings
from app.runtime import Runtime
from app.stack import commands
from app.store.exits import recent_exits
from tests.support.servers import gpuq_up, until

GPUQ = str(Path(sys.executable).parent / "gpuq")


@pytest.mark.parametrize("build", [commands.beat_command, commands.control_worker_command,
                                   commands.flower_command])
def test_server_commands_keep_an_interpreter_and_a_home_with_spaces_one_word(
        build, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", "/opt/my envs/gpu q/bin/python")
    settings = Settings(home=tmp_path / "my home", _env_file=None)
    argv = shlex.split(build(settings))
    assert argv[:3] == ["/opt/my envs/gpu q/bin/python", "-m", "celery"]
    if build is commands.beat_command:
        assert argv[argv.index("-s") + 1] == str(tmp_path / "my home" / "beat-schedule")


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_up_with_a_home_with_a_space_runs_a_job_and_beat_keeps_running(tmp_path):
    home = tmp_path / "gpu queue home"
    settings = Settings(home=home, redis_url=None, database_url=None, hostname="spacehost",
                        fake_gpus=1, heartbeat_s=1, _env_file=None)
    with gpuq_up(settings, tmp_path, workers=1) as env:
        def gpuq(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([GPUQ, *args], env=env, capture_output=True, text=True,
                                  timeout=60)

        job = gpuq("submit", "--", "echo", "spaced-ok").stdout.strip()
        assert gpuq("wait", job, "--timeout", "60").returncode == 0
        assert "spaced-ok" in gpuq("logs", job).stdout
        # beat is up, with its schedule in the home, and has not exited once
        until(lambda: list(home.glob("beat-schedule*")), 60)
        assert _running_with_argument(str((home / "beat-schedule").resolve()))
        rt = Runtime(settings)  # the embedded Redis of this home
        try:
            assert [p for p in recent_exits(rt.redis) if p["program"] == "beat"] == []
        finally:
            rt.close()



def _running_with_argument(argument: str) -> list[int]:
    """Processes one of whose arguments is `argument`, whole."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if argument in argv:
            found.append(int(proc.name))
    return found
