"""Direct execution: a job's command in its own process group, output to its log file."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from app.core import job_env, logcap
from app.core.accounts import RunAs, account_environment, as_account, setpriv_path
from app.core.procgroup import ExitWaiter, stop_group, wait_group_gone
from app.store.models import Job
from scheduler.worker.containment import Container, Usage

POLL_S = 0.05
DEFAULT_LOG_MAX_BYTES = 2**30  # Settings.log_max_bytes


# Why gpuq stopped a job before it ended by itself.
CANCEL = "cancel"  # a user cancelled it
LEASE = "lease"  # its worker could not renew its lease in time (database or network away)
SUPERSEDED = "superseded"  # its attempt is no longer the job's (settled, or run anew)
SHUTDOWN = "shutdown"  # its worker is shutting down
TIMEOUT = "timeout"  # it reached its time limit (--time)


@dataclass
class Outcome:
    exit_code: int
    stopped: str | None = None  # CANCEL, LEASE, SUPERSEDED, SHUTDOWN or TIMEOUT; None: ended
    usage: Usage | None = None  # the job's CPU and memory, where its container reads them

    @property
    def cancelled(self) -> bool:
        return self.stopped == CANCEL


def job_environment(job: Job, base: dict[str, str], gpu_ids: list[int], host: str,
                    secrets: dict[str, str] | None = None,
                    now: float | None = None) -> dict[str, str]:
    """The environment a replica sees (app/core/job_env.py): the allow-listed part of the
    worker's `base`, the user's variables, gpuq's own, then its secrets. Nothing else of
    the worker's reaches it: its GPUQ_* settings hold the broker's and the database's
    passwords, and a job that prints its environment would log them."""
    own = dict(job.env)
    if job.venv:
        venv = str(Path(job.venv).expanduser())
        own["VIRTUAL_ENV"] = venv
        own["PATH"] = f"{venv}/bin:{own.get('PATH', base.get('PATH', ''))}"
    gpuq = {
        "GPUQ_JOB_ID": str(job.id),
        "GPUQ_LAUNCH_ID": "" if job.launch_id is None else str(job.launch_id),
        "GPUQ_JOB_RANK": str(job.rank),
        "GPUQ_NUM_JOBS": str(job.num_jobs),
        "GPUQ_RESTART_COUNT": str(job.restart_count),
        "GPUQ_ATTEMPT": str(job.attempt),
        "GPUQ_HOST": host,
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpu_ids),
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }
    if job.time_limit_s is not None:
        # Read just before the start that begins the attempt's timer: never later than the
        # limit the worker enforces from the recorded start.
        started = time.time() if now is None else now
        gpuq["GPUQ_JOB_DEADLINE"] = str(int(started + job.time_limit_s))
    return job_env.job_environment(own, gpuq, secrets, environ=base)


def shell_script(job: Job, command: str) -> str:
    """The bash script that runs the command, activating a conda env when one is named."""
    if not job.conda_env:
        return command
    return (f'eval "$(conda shell.bash hook)" && conda activate {shlex.quote(job.conda_env)} '
            f"&& {command}")


_SHELL_SYNTAX = re.compile(r"[|&;<>()$`\\*?\[\]#~{}!\n]")
# shlex.split is quadratic in the length of one token (400 kB: seconds of a worker's CPU);
# a command longer than this goes to bash, which reads it in linear time.
SPLIT_LIMIT_CHARS = 4096


def argv_for(job: Job, command: str, env: dict[str, str]) -> list[str]:
    """The process to start: the command itself when it is a short plain program with
    arguments (saving a shell per job), else `bash -c` for anything that needs a shell."""
    plain = len(command) <= SPLIT_LIMIT_CHARS and not _SHELL_SYNTAX.search(command)
    if not job.conda_env and plain:
        try:
            words = shlex.split(command)
        except ValueError:
            words = []
        if words and "=" not in words[0] and shutil.which(words[0], path=env.get("PATH")):
            return words
    return [BASH, "-c", shell_script(job, command)]


# gpuq's own programs, found on the worker's PATH as it starts: a program named without its
# directory would be looked up on the job's PATH, which the job may have set to anything
# (`--env PATH=...`) or shadowed with a venv of its own.
BASH = shutil.which("bash") or "/bin/bash"
# The job's leader gets SIGKILL when the worker thread that started it dies (a SIGKILLed
# worker must not leave its job running unwatched: it would run on after its lease ran out).
_SETPRIV = setpriv_path()
_PDEATHSIG = [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []


class Stop(NamedTuple):
    reason: str  # CANCEL, LEASE, SUPERSEDED, SHUTDOWN or TIMEOUT
    with_grace: bool  # SIGTERM and the kill grace first; else SIGKILL at once


def grace_for(reason: str, grace_s: float, kill_wait_s: float | None) -> float:
    """The wait between SIGTERM and SIGKILL: the kill wait (GPUQ_KILL_WAIT_S) for a job at
    its time limit, which it may spend saving its work; the kill grace for any other stop."""
    return kill_wait_s if reason == TIMEOUT and kill_wait_s is not None else grace_s


def watched_start(on_start: Callable[[int], bool], pid: int,
                  should_stop: Callable[[], str | None]) -> Stop | None:
    """Record the start of process `pid` with `on_start(pid)` while the job is watched as
    it will be once it runs: a database away right then must not leave it running unwatched
    past its lease (the record waits out such an outage only while the lease lasts).

    None when the job runs on. Else why it must stop now, and whether with the kill grace:
    a reason of `should_stop` (the lease running out, a cancel, a shutdown) gets it; a job
    the record found unwanted (SUPERSEDED: cancelled while it started, requeued, or its
    lease gone) is stopped at once. Raises what `on_start` raised, unless the job must stop
    anyway."""
    done = threading.Event()
    wanted: list[bool] = []
    failed: list[BaseException] = []

    def record() -> None:
        try:
            wanted.append(on_start(pid))
        except BaseException as e:  # handed to the watching thread
            failed.append(e)
        finally:
            done.set()

    threading.Thread(target=record, daemon=True, name=f"gpuq-start-{pid}").start()
    while not done.wait(POLL_S):
        if (reason := should_stop()) is not None:
            return Stop(reason, with_grace=True)
    if failed:
        if (reason := should_stop()) is not None:
            return Stop(reason, with_grace=True)  # the record gave up: the job stops anyway
        raise failed[0]
    return None if wanted[0] else Stop(should_stop() or SUPERSEDED, with_grace=False)


def run(job: Job, command: str, env: dict[str, str], log_path: Path, *, grace_s: float,
        should_stop: Callable[[], str | None], on_start: Callable[[int], bool],
        log_max_bytes: int = DEFAULT_LOG_MAX_BYTES, container: Container | None = None,
        account: RunAs | None = None, kill_wait_s: float | None = None) -> Outcome:
    """Run the job to its end, or until `should_stop` names a reason to stop it. Its output
    reaches its log through a pipe, pumped on a thread of this worker into the capped log.

    The job starts inside `container` (scheduler/worker/containment.py), which is emptied
    before this returns, and as `account` when one is given (else as the worker's own).
    `on_start(pid)` records the start and says whether the job is still wanted; the job is
    watched while it does (`watched_start`)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if account is not None:
        env = account_environment(account, env)
    prefix = [*(container.prefix() if container else []),
              *(as_account(account) if account else _PDEATHSIG)]
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            [*prefix, *argv_for(job, command, env)], stdin=subprocess.DEVNULL,
            stdout=write_fd, stderr=subprocess.STDOUT, cwd=job.workdir or None, env=env,
            start_new_session=True, umask=account.umask if account else -1,
        )
    except BaseException:
        os.close(read_fd)
        if container is not None:
            container.close()
        raise
    finally:
        os.close(write_fd)
    pump = logcap.Pump(read_fd, logcap.CappedLog(log_path, log_max_bytes))
    pump.start()
    try:
        outcome = _watch(proc, grace_s, kill_wait_s, should_stop, on_start,
                         container.terminate if container is not None else None)
    finally:
        if container is not None:  # what the job left behind, daemons included
            container.kill_all()
        pump.finish()
    if container is not None:
        outcome.usage = container.usage()
        container.close()
    return outcome


def _watch(proc: subprocess.Popen[bytes], grace_s: float, kill_wait_s: float | None,
           should_stop: Callable[[], str | None], on_start: Callable[[int], bool],
           terminate: Callable[[], None] | None = None) -> Outcome:
    """Wait for the job's end, or stop it when `should_stop` names a reason: with a grace
    period, SIGTERM reaches its container's every process (`terminate`) as its group's."""
    try:
        stop = watched_start(on_start, proc.pid, should_stop)
    except BaseException:
        stop_group(proc, 0)
        raise
    if stop is not None:
        if stop.with_grace and terminate is not None:
            terminate()
        stop_group(proc, grace_for(stop.reason, grace_s, kill_wait_s) if stop.with_grace else 0)
        return Outcome(proc.returncode, stopped=stop.reason)
    waiter = ExitWaiter(proc)
    try:
        while not waiter.exited(POLL_S):
            if (reason := should_stop()) is not None:
                if terminate is not None:
                    terminate()
                stop_group(proc, grace_for(reason, grace_s, kill_wait_s))
                return Outcome(proc.returncode, stopped=reason)
    finally:
        waiter.close()
    code = proc.wait()
    # The leader exited; stop anything it left behind in its group before the GPUs go back.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
        wait_group_gone(proc.pid)
    return Outcome(code)
