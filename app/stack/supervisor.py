"""Keep a set of processes running: restart the one that dies, with backoff; stop them all,
in order, on SIGINT or SIGTERM.

Plain honcho stops every process when one exits; a GPU box must instead lose one worker
for a moment, not the whole stack. Procfile parsing is honcho's. A server started before
the programs, which they need (the embedded Redis), is adopted and restarted the same way.

Stopping: nothing is started again once a stop began. Programs stop by stage, lowest first
(the workers that run jobs before the servers they report to), each stage's programs
together: SIGTERM to each one's process group, SIGKILL to the group if it is still there
after the program's own stop timeout. Whatever is left of the supervisor's tree then (a job
whose worker had to be killed: the supervisor is a subreaper, see app/stack/reaper.py) its
caller kills with `reaper.sweep()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from honcho.environ import parse_procfile

from app.stack import reaper

log = logging.getLogger(__name__)

STABLE_AFTER_S = 10.0  # a process that lived this long resets its backoff
MAX_BACKOFF_S = 30.0


@dataclass
class Program:
    name: str
    command: str  # run by /bin/sh, as Procfile lines are
    env: dict[str, str] = field(default_factory=dict)
    # How long it may take to stop after SIGTERM before its group is killed (None: the
    # supervisor's default), and when it stops: lower stages first.
    stop_timeout_s: float | None = None
    stop_stage: int = 1
    # How to start it again when it is not a Procfile line but a server gpuq starts itself
    # (the embedded Redis, adopted once running: see Supervisor.adopt).
    spawn: Callable[[], subprocess.Popen[bytes]] | None = None


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
                 on_exit: Callable[[str, int, float], None] | None = None,
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.children = [_Child(p) for p in programs]
        # Told (program name, exit code, seconds until the restart) of every exit, so
        # that a crash loop is reported rather than hidden by the restarts.
        self.on_exit = on_exit
        self.base_env = dict(base_env if base_env is not None else os.environ)
        self.stop_grace_s = stop_grace_s
        self.pass_fds = pass_fds  # open files every child shares (the host lock)
        self._stopping = False
        self._subreaper = False

    @property
    def stopping(self) -> bool:
        return self._stopping

    def request_stop(self) -> None:
        """From here on nothing is started or restarted."""
        self._stopping = True

    def stop_timeout_s(self) -> float:
        """The longest a stop may take: each stage's slowest program, stage after stage."""
        stages: dict[int, float] = {}
        for child in self.children:
            p = child.program
            timeout = p.stop_timeout_s if p.stop_timeout_s is not None else self.stop_grace_s
            stages[p.stop_stage] = max(stages.get(p.stop_stage, 0.0), timeout)
        return sum(stages.values())

    def adopt(self, program: Program, proc: subprocess.Popen[bytes]) -> None:
        """Supervise a process started already (the embedded Redis, which the programs
        need before they start): it is started again with `program.spawn` when it exits,
        and stopped with its stage."""
        assert program.spawn is not None, "an adopted program says how to start it again"
        self.children.append(_Child(program, proc, started_at=time.monotonic()))

    def _spawn(self, child: _Child) -> None:
        if self._stopping:
            return
        if child.program.spawn is not None:
            child.proc = child.program.spawn()
        else:
            env = {**self.base_env, **child.program.env}
            parent = os.getpid()
            child.proc = subprocess.Popen(
                ["/bin/sh", "-c", f"exec {this_gpuq(child.program.command)}"], env=env,
                start_new_session=True, pass_fds=self.pass_fds,
                preexec_fn=lambda: reaper.terminate_with_parent(parent))
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("started %s (pid %s)", child.program.name, child.proc.pid)

    def start(self) -> None:
        for child in self.children:
            if child.proc is None:  # an adopted one runs already
                self._spawn(child)

    def poll(self) -> None:
        """Restart children that exited, each after its own backoff."""
        now = time.monotonic()
        for child in self.children:
            if self._stopping:
                return
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
        if self._subreaper:
            # Processes of this tree whose parent died came to this one.
            reaper.reap_adopted({c.proc.pid for c in self.children if c.proc is not None})

    def run_forever(self) -> None:
        """Supervise until SIGINT or SIGTERM, then stop every child."""
        with self.stopped_by_signals():
            self.supervise()

    @contextlib.contextmanager
    def stopped_by_signals(self) -> Iterator[None]:
        """While inside, SIGINT and SIGTERM (the first and any later one) only ask for the
        stop: a second Ctrl-C does not cut an orderly stop short and leave processes."""
        def _stop(_sig: int, _frame: object) -> None:
            self.request_stop()

        previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def supervise(self) -> None:
        """Start the programs and keep them running until `request_stop()` (a signal
        handler's), then stop them all; the caller handles the signals."""
        self._subreaper = reaper.become_subreaper()
        try:
            self.start()
            while not self._stopping:
                self.poll()
                time.sleep(0.2)
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop every child, stage by stage: SIGTERM its group, SIGKILL the group when the
        program outlives its stop timeout."""
        self._stopping = True
        if any(c.proc is not None and c.proc.poll() is None for c in self.children):
            log.warning("stopping %s (within %.0fs)",
                        ", ".join(c.program.name for c in self.children), self.stop_timeout_s())
        for stage in sorted({c.program.stop_stage for c in self.children}):
            self._stop_stage([c for c in self.children if c.program.stop_stage == stage])
        for child in self.children:
            child.proc = None

    def _stop_stage(self, children: list[_Child]) -> None:
        live = [c for c in children if c.proc is not None and c.proc.poll() is None]
        for child in live:
            assert child.proc is not None
            log.info("stopping %s (pid %s)", child.program.name, child.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.proc.pid, signal.SIGTERM)
        start = time.monotonic()
        for child in live:
            assert child.proc is not None
            timeout = (child.program.stop_timeout_s if child.program.stop_timeout_s is not None
                       else self.stop_grace_s)
            try:
                child.proc.wait(timeout=max(0.1, start + timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs: killed", child.program.name, timeout)
            # Children that ignored SIGTERM may still hold the group after the leader left.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.proc.pid, signal.SIGKILL)
            child.proc.wait()
