"""Keep a set of processes running: restart the one that dies, with backoff.

Plain honcho stops every process when one exits; a GPU box must instead lose one worker
for a moment, not the whole stack. Procfile parsing is honcho's.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from honcho.environ import parse_procfile

from app.core.procgroup import stop_groups

log = logging.getLogger(__name__)

STABLE_AFTER_S = 10.0  # a process that lived this long resets its backoff
MAX_BACKOFF_S = 30.0


@dataclass
class Program:
    name: str
    command: str  # run by /bin/sh, as Procfile lines are
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class _Child:
    program: Program
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = 0.5
    restart_at: float | None = None


def this_gpuq(command: str) -> str:
    """A Procfile line whose program is `gpuq`, made to run the gpuq that runs this
    supervisor, even when its venv is not activated (and so not on PATH). Only the program
    is rewritten: the jobs a worker starts keep the PATH they were given. The directory is
    not resolved: a venv's python is a symlink out of it."""
    own = Path(sys.executable).parent / "gpuq"
    word, _, rest = command.partition(" ")
    if word != "gpuq" or not own.exists():
        return command
    return f"{shlex.quote(str(own))} {rest}".rstrip()


def read_procfile(path: Path) -> list[Program]:
    procfile = parse_procfile(path.read_text())
    return [Program(name, command) for name, command in procfile.processes.items()]


class Supervisor:
    """Starts programs in their own process groups and restarts those that exit."""

    def __init__(self, programs: list[Program], base_env: Mapping[str, str] | None = None,
                 stop_grace_s: float = 10.0,
                 on_exit: Callable[[str, int, float], None] | None = None) -> None:
        self.children = [_Child(p) for p in programs]
        # Told (program name, exit code, seconds until the restart) of every exit, so
        # that a crash loop is reported rather than hidden by the restarts.
        self.on_exit = on_exit
        self.base_env = dict(base_env if base_env is not None else os.environ)
        self.stop_grace_s = stop_grace_s
        self._stopping = False

    def _spawn(self, child: _Child) -> None:
        env = {**self.base_env, **child.program.env}
        child.proc = subprocess.Popen(["/bin/sh", "-c", f"exec {this_gpuq(child.program.command)}"],
                                      env=env, start_new_session=True)
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("started %s (pid %s)", child.program.name, child.proc.pid)

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def poll(self) -> None:
        """Restart children that exited, each after its own backoff."""
        now = time.monotonic()
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                code = child.proc.returncode
                child.proc = None
                lived = now - child.started_at
                child.backoff_s = 0.5 if lived > STABLE_AFTER_S else min(
                    child.backoff_s * 2, MAX_BACKOFF_S)
                child.restart_at = now + child.backoff_s
                child.restarts += 1
                log.warning("%s exited with %s after %.1fs; restarting in %.1fs",
                            child.program.name, code, lived, child.backoff_s)
                if self.on_exit is not None:
                    self.on_exit(child.program.name, code, child.backoff_s)
            if child.proc is None and child.restart_at is not None and now >= child.restart_at:
                self._spawn(child)

    def run_forever(self) -> None:
        """Supervise until SIGINT or SIGTERM, then stop every child."""
        def _stop(_sig: int, _frame: object) -> None:
            self._stopping = True

        previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            while not self._stopping:
                self.poll()
                time.sleep(0.2)
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        """SIGTERM every child's group, then SIGKILL what is left after the grace period."""
        stop_groups([c.proc for c in self.children if c.proc is not None], self.stop_grace_s)
        for child in self.children:
            child.proc = None


