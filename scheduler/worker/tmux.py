"""Attachable execution: the job runs in a detached tmux session named after it.

`gpuq attach ID` attaches to it on the worker's host; the output still reaches the job's log
(through tee), and cancel still stops the whole process group of the pane.
"""

from __future__ import annotations

import errno
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from app.core import logcap
from app.core.paths import JobPaths
from app.core.procgroup import stop_pane_group
from app.store.models import Job
from scheduler.worker.containment import Container
from scheduler.worker.executor import (
    BASH,
    DEFAULT_LOG_MAX_BYTES,
    POLL_S,
    Outcome,
    grace_for,
    shell_script,
    watched_start,
)

KILLED_EXIT = 137


def session_name(job_id: int | None) -> str:
    return f"gpuq-{job_id}"


def tmux_command(socket: Path, *args: str) -> list[str]:
    return ["tmux", "-S", str(socket), *args]


def env_fifo(paths: JobPaths) -> Path:
    """The pipe an attachable attempt's script reads its environment from."""
    return paths.tmux_script.with_name(f"{paths.job_id}.tmux.env")


def _script(job: Job, command: str, fifo: Path, log_path: Path, exit_path: Path,
            log_max_bytes: int, joins: list[Path] | None = None) -> str:
    """The script the pane runs: its environment comes through the pipe, never from the
    file (the script holds no value of it) nor from the tmux server, which has the
    environment of the worker that started it (the pane starts under `env -i`).

    Every program gpuq runs here is named by the path the worker found it at, and runs
    before the job's environment is in force or by that path: the job's PATH may hold
    anything. The job's output goes to the pane and to its capped log through logcap.py
    (in place of `tee`), run by the worker's interpreter."""
    workdir = f"cd {shlex.quote(job.workdir)}\n" if job.workdir else ""
    script = shlex.quote(shell_script(job, command))
    fifo_text = shlex.quote(str(fifo))
    writer = shlex.join([sys.executable, "-I", logcap.__file__, str(log_path),
                         str(log_max_bytes)])
    # The pane comes inside the attempt's container first (scheduler/worker/containment.py).
    enter = "".join(f"echo $$ > {shlex.quote(str(path))}\n" for path in joins or [])
    return (f'{enter}gpuq_env="$(cat {fifo_text})"\nrm -f {fifo_text}\neval "$gpuq_env"\n'
            "unset gpuq_env\n"
            f"{workdir}"
            f"{shlex.quote(BASH)} -c {script} 2>&1 | {writer}\n"
            f"echo ${{PIPESTATUS[0]}} > {shlex.quote(str(exit_path))}\n")


def _exports(env: dict[str, str]) -> bytes:
    """The job's environment as shell; TERM stays the pane's own."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()
                   if k.isidentifier() and k != "TERM").encode()


def _hand_over(fifo: Path, data: bytes, alive: Callable[[], bool]) -> None:
    """Write the environment into the pipe once the script opens it (a pipe holds it in
    memory only); give up when the pane is gone first."""
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            if e.errno != errno.ENXIO or not alive():  # ENXIO: no reader yet
                return
            time.sleep(POLL_S)
    try:
        os.set_blocking(fd, True)
        with open(fd, "wb", closefd=True) as pipe:
            pipe.write(data)
    except BrokenPipeError:
        pass


def run(job: Job, command: str, env: dict[str, str], log_path: Path, *, socket: Path,
        paths: JobPaths, grace_s: float,
        should_stop: Callable[[], str | None], on_start: Callable[[int], bool],
        log_max_bytes: int = DEFAULT_LOG_MAX_BYTES, container: Container | None = None,
        kill_wait_s: float | None = None) -> Outcome:
    """Run the job in `tmux new-session -d` and wait for it like the direct executor, its
    pane inside `container`, which is emptied before this returns. Its script and pipe are
    removed when the attempt ends."""
    script_path, fifo = paths.tmux_script, env_fifo(paths)
    try:
        outcome = _run(job, command, env, log_path, socket, paths, (grace_s, kill_wait_s),
                       should_stop, on_start, log_max_bytes,
                       container.join_files() if container else [])
    finally:
        script_path.unlink(missing_ok=True)
        fifo.unlink(missing_ok=True)
        if container is not None:
            container.kill_all()
    if container is not None:
        outcome.usage = container.usage()
        container.close()
    return outcome


def _run(job: Job, command: str, env: dict[str, str], log_path: Path, socket: Path,
         paths: JobPaths, graces: tuple[float, float | None],
         should_stop: Callable[[], str | None], on_start: Callable[[int], bool],
         log_max_bytes: int, joins: list[Path]) -> Outcome:
    name = session_name(job.id)
    script_path, exit_path, fifo = paths.tmux_script, paths.tmux_exit, env_fifo(paths)
    exit_path.unlink(missing_ok=True)
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo, 0o600)
    script_path.write_text(_script(job, command, fifo, log_path, exit_path, log_max_bytes,
                                   joins))
    bash = BASH
    # -P prints the pane's pid as the session is made: a short job may be gone a moment later.
    pane_pid = int(subprocess.run(
        tmux_command(socket, "new-session", "-d", "-P", "-F", "#{pane_pid}", "-s", name,
                     "-x", "200", "-y", "50",
                     f'env -i TERM="$TERM" {shlex.quote(bash)} {shlex.quote(str(script_path))}'),
        check=True, capture_output=True, text=True).stdout.strip())
    _hand_over(fifo, _exports(env), lambda: _alive(socket, name))
    try:
        stop = watched_start(on_start, pane_pid, should_stop)
    except BaseException:
        stop_pane_group(pane_pid, 0)
        subprocess.run(tmux_command(socket, "kill-session", "-t", name), capture_output=True)
        raise
    while not exit_path.exists() and _alive(socket, name):
        reason, with_grace = stop if stop is not None else (should_stop(), True)
        if reason is not None:
            stop_pane_group(pane_pid, grace_for(reason, *graces) if with_grace else 0)
            subprocess.run(tmux_command(socket, "kill-session", "-t", name),
                           capture_output=True)
            return Outcome(KILLED_EXIT, stopped=reason)
        time.sleep(POLL_S)
    code = int(exit_path.read_text().strip() or KILLED_EXIT) if exit_path.exists() else KILLED_EXIT
    stop_pane_group(pane_pid, 0)
    return Outcome(code)


def _alive(socket: Path, name: str) -> bool:
    return subprocess.run(tmux_command(socket, "has-session", "-t", name),
                          capture_output=True).returncode == 0
