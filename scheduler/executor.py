"""Direct execution: a job's command in its own process group, output to its log file."""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.models import Job

POLL_S = 0.05


@dataclass
class Outcome:
    exit_code: int
    cancelled: bool


def job_environment(job: Job, base: dict[str, str], gpu_ids: list[int], host: str
                    ) -> dict[str, str]:
    """The environment a replica sees: the worker's, the user's, then gpuq's own.

    The worker's own GPUQ_* settings are left out: they may hold the broker's or the
    database's password, and a job that prints its environment would log them."""
    env = {k: v for k, v in base.items() if not k.startswith("GPUQ_")}
    env.update(job.env)
    if job.venv:
        venv = str(Path(job.venv).expanduser())
        env["VIRTUAL_ENV"] = venv
        env["PATH"] = f"{venv}/bin:{env.get('PATH', '')}"
    env.update(
        GPUQ_JOB_ID=str(job.id),
        GPUQ_LAUNCH_ID="" if job.launch_id is None else str(job.launch_id),
        GPUQ_JOB_RANK=str(job.rank),
        GPUQ_NUM_JOBS=str(job.num_jobs),
        GPUQ_RESTART_COUNT=str(job.restart_count),
        GPUQ_HOST=host,
        CUDA_VISIBLE_DEVICES=",".join(str(i) for i in gpu_ids),
        CUDA_DEVICE_ORDER="PCI_BUS_ID",
    )
    return env


def shell_script(job: Job, command: str) -> str:
    """The bash script that runs the command, activating a conda env when one is named."""
    if not job.conda_env:
        return command
    return (f'eval "$(conda shell.bash hook)" && conda activate {shlex.quote(job.conda_env)} '
            f"&& {command}")


_SHELL_SYNTAX = re.compile(r"[|&;<>()$`\\*?\[\]#~{}!\n]")


def argv_for(job: Job, command: str, env: dict[str, str]) -> list[str]:
    """The process to start: the command itself when it is a plain program with arguments
    (saving a shell per job), else `bash -c` for anything that needs a shell."""
    if not job.conda_env and not _SHELL_SYNTAX.search(command):
        try:
            words = shlex.split(command)
        except ValueError:
            words = []
        if words and "=" not in words[0] and shutil.which(words[0], path=env.get("PATH")):
            return words
    return ["bash", "-c", shell_script(job, command)]


def stop_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the whole process group, then SIGKILL it if it outlives the grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    # Children that ignored SIGTERM may still hold the group after the leader left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _wait_group_gone(proc.pid)


def stop_pane_group(pgid: int, grace_s: float) -> None:
    """Like stop_group for a process group gpuq did not spawn itself (a tmux pane)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and group_exists(pgid):
        time.sleep(POLL_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    _wait_group_gone(pgid)


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_group_gone(pgid: int, timeout_s: float = 5.0) -> None:
    """Killed orphans are reaped by init a moment later; report a job stopped only then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and group_exists(pgid):
        time.sleep(0.01)


class _ExitWaiter:
    """Waits for a process's exit sleeping in the kernel (pidfd), not polling; Popen's own
    polling wait is the fallback where pidfd is missing."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.fd: int | None = None
        with contextlib.suppress(AttributeError, OSError):
            self.fd = os.pidfd_open(proc.pid)
            self.poller = select.poll()
            self.poller.register(self.fd, select.POLLIN)

    def exited(self, timeout_s: float) -> bool:
        if self.fd is not None:
            return bool(self.poller.poll(timeout_s * 1000))
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def run(job: Job, command: str, env: dict[str, str], log_path: Path, *, grace_s: float,
        cancel_requested: Callable[[], bool], on_start: Callable[[int], bool],
        heartbeat: Callable[[], None], heartbeat_s: float) -> Outcome:
    """Run the job to its end, or until `cancel_requested` says stop.

    `on_start(pid)` records the start and says whether the job is still wanted."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv_for(job, command, env), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, cwd=job.workdir or None, env=env,
            start_new_session=True,
        )
    if not on_start(proc.pid):  # cancelled while it was starting
        stop_group(proc, 0)
        return Outcome(proc.returncode, cancelled=True)
    next_beat = time.monotonic() + heartbeat_s
    waiter = _ExitWaiter(proc)
    try:
        while not waiter.exited(POLL_S):
            if cancel_requested():
                stop_group(proc, grace_s)
                return Outcome(proc.returncode, cancelled=True)
            if time.monotonic() >= next_beat:
                heartbeat()
                next_beat = time.monotonic() + heartbeat_s
    finally:
        waiter.close()
    code = proc.wait()
    # The leader exited; stop anything it left behind in its group before the GPUs go back.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
        _wait_group_gone(proc.pid)
    return Outcome(code, cancelled=False)
