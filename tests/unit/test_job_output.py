"""A job's output and start: its whole log however long, a cap that keeps the head and the
newest part, and gpuq's own programs found on the worker's PATH whatever the job's PATH."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.client import Client
from app.core.logcap import MARKER, CappedLog, head_bytes
from app.core.paths import JobPaths
from app.runtime import Runtime
from app.store import cluster
from app.store.models import Job
from scheduler.worker import tmux
from scheduler.worker.attempt import run_attempt
from tests.support.servers import IN_CI, ROOT, server_env

GPUQ = str(Path(sys.executable).parent / "gpuq")
CAP = 64 * 1024
LINES = 20_000  # "line 00001\n" ...: 11 bytes each, 220 kB in all, far past the cap


def _gpuq(settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GPUQ, *args], env=server_env(settings), capture_output=True,
                          text=True, timeout=120)


def _run_once(settings, command: str, **options) -> tuple[Client, int, str]:
    """Submit a 0-GPU job into a CPU slot and run its first attempt here, as the CPU worker
    does."""
    client = Client(settings, "local")
    worker = Runtime(settings)
    cluster.beat_cpu(worker.redis, settings.hostname, 1, 600)
    job = client.submit(command, gpus=0, **options)
    try:
        ended = run_attempt(worker, job.id, 1)
    finally:
        worker.close()
    return client, job.id, ended


@pytest.fixture
def capped(settings):
    return settings.model_copy(update={"log_max_bytes": CAP})


def _check_capped(text: bytes) -> None:
    """The head whole, the line saying what was dropped, then the newest lines in order."""
    assert len(text) <= CAP
    head = text[:head_bytes(CAP)]
    assert b"line 00001\nline 00002\n" in head
    found = MARKER.match(text, head_bytes(CAP))
    assert found, text[head_bytes(CAP):head_bytes(CAP) + 80]
    tail = text[found.end():]
    numbers = [int(n) for n in re.findall(rb"line (\d{5})\n", tail)]
    assert numbers[-1] == LINES and numbers == list(range(numbers[0], LINES + 1))
    written = len(text) - len(found[0]) + int(found[1])
    assert written >= LINES * 11, "the count says what was dropped"


def test_a_job_writing_past_the_log_cap_keeps_its_head_and_newest_part(capped):
    client, job_id, ended = _run_once(capped, f"seq -f 'line %05g' 1 {LINES}")
    assert ended == "SUCCEEDED"
    _check_capped(JobPaths(capped.home, job_id).log.read_bytes())
    # and reading it whole, or its last lines, reads across the dropped part
    assert client.job(job_id).logs(tail=2) == f"line {LINES - 1:05d}\nline {LINES:05d}\n"
    assert client.job(job_id).logs(head=1).startswith("== gpuq: job ")
    client.close()


def test_an_attachable_job_writing_past_the_log_cap_is_capped_too(tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    paths = JobPaths(tmp_path, 7)
    paths.logs_dir.mkdir(parents=True)
    job = Job(id=7, command="x", tmux=True)
    socket = tmp_path / "tmux.sock"
    try:
        outcome = tmux.run(job, f"seq -f 'line %05g' 1 {LINES}",
                           {"PATH": "/nonexistent"}, paths.log, socket=socket, paths=paths,
                           grace_s=1, should_stop=lambda: None, on_start=lambda _pid: True,
                           log_max_bytes=CAP)
    finally:
        subprocess.run(["tmux", "-S", str(socket), "kill-server"], capture_output=True)
    assert outcome.exit_code == 127, "seq is not on the job's PATH: bash says so"
    assert b"seq: command not found" in paths.log.read_bytes()
    paths.log.unlink()
    try:
        outcome = tmux.run(job, f"seq -f 'line %05g' 1 {LINES}",
                           {"PATH": os.environ["PATH"]}, paths.log, socket=socket,
                           paths=paths, grace_s=1, should_stop=lambda: None,
                           on_start=lambda _pid: True, log_max_bytes=CAP)
    finally:
        subprocess.run(["tmux", "-S", str(socket), "kill-server"], capture_output=True)
    assert outcome.exit_code == 0
    text = paths.log.read_bytes()
    assert text.startswith(b"line 00001\n")
    _check_capped(text)


def test_gpuq_logs_prints_the_whole_log_and_its_head_or_tail(settings):
    client = Client(settings, "local")
    job = client.submit("true")
    log = JobPaths(settings.home, job.id).log
    log.parent.mkdir(parents=True)
    # 3 MiB of lines, a character of several bytes across each 1 MiB boundary, the error last
    body = "".join(f"step {n:07d} é\n" for n in range(200_000)) + "Error: out of memory\n"
    log.write_text(body)
    whole = _gpuq(settings, "logs", str(job.id))
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout == body
    assert _gpuq(settings, "logs", str(job.id), "--tail", "2").stdout == (
        "step 0199999 é\nError: out of memory\n")
    assert _gpuq(settings, "logs", str(job.id), "--head", "2").stdout == (
        "step 0000000 é\nstep 0000001 é\n")
    assert client.job(job.id).logs() == body
    both = _gpuq(settings, "logs", str(job.id), "--head", "1", "--tail", "1")
    assert both.returncode == 2 and "cannot be used together" in both.stderr
    client.close()


def test_a_job_starts_whatever_its_path_and_sees_its_attempt(settings, tmp_path):
    # A venv that shadows every program gpuq starts a job with
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for program in ("bash", "setpriv", "sh", "python3"):
        shim = venv / "bin" / program
        shim.write_text("#!/bin/sh\necho shadowed >&2\nexit 99\n")
        shim.chmod(0o755)
    checked = settings.model_copy(update={"preflight_commands": {"fake-pass": "echo good"}})
    client, job_id, ended = _run_once(checked, "echo attempt=$GPUQ_ATTEMPT; exit 0",
                                      env={"PATH": "/nonexistent"}, preflight="fake-pass")
    assert ended == "SUCCEEDED", client.job(job_id).logs()
    assert "attempt=1\n" in client.job(job_id).logs()
    _, shadowed_id, ended = _run_once(settings, "echo in the venv", venv=str(venv))
    assert ended == "SUCCEEDED", client.job(shadowed_id).logs()
    assert "in the venv" in client.job(shadowed_id).logs()
    client.close()


RUN_ON_A_FULL_DISK = """
import sys
from pathlib import Path
from app.store.models import Job
from scheduler.worker import executor
log = Path(sys.argv[1])
outcome = executor.run(Job(id=3, command="x"), "seq 1 300000", {"PATH": "/usr/bin:/bin"},
                       log, grace_s=1, should_stop=lambda: None, on_start=lambda _pid: True)
print("exit", outcome.exit_code)
"""


def test_a_job_on_a_full_disk_runs_to_its_end_its_output_dropped(tmp_path):
    # Given a log directory on a disk with no room (a tmpfs in a mount namespace of its own)
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode != 0:
        if IN_CI:
            raise AssertionError("CI must allow `unshare -m` (root, or CAP_SYS_ADMIN)")
        pytest.skip("a mount namespace of its own needs root or CAP_SYS_ADMIN")
    logs = tmp_path / "logs"
    logs.mkdir()
    script = (f"mount -t tmpfs -o size=64k tmpfs {logs}\n"
              f"dd if=/dev/zero of={logs}/filler bs=4k 2>/dev/null || true\n"
              f"exec {sys.executable} -c '{RUN_ON_A_FULL_DISK}' {logs}/3.log")
    # When a job prints 2 MB there, Then it still ends by itself (never stalled on its pipe)
    ran = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "exit 0"


def test_a_follower_whose_offset_a_cut_passed_goes_on_at_the_marker(settings):
    own = settings.model_copy(update={"log_max_bytes": CAP})
    client = Client(own, "local")
    job = client.submit("true")
    path = JobPaths(own.home, job.id).log
    path.parent.mkdir(parents=True)
    log = CappedLog(path, CAP)
    log.write(b"a" * 60_000)
    followed_to = client.call("logs", job_id=job.id, offset=0)["size"]
    log.write(b"b" * 30_000)  # past the cap: the middle is dropped, the file shrinks
    log.close()
    assert path.stat().st_size < followed_to
    out = client.call("logs", job_id=job.id, offset=followed_to)
    assert out["text"].startswith("\n== gpuq: ") and out["text"].endswith("b" * 100)
    client.close()
