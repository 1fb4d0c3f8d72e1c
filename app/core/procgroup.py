"""Process groups: stop one (SIGTERM, then SIGKILL after a grace period), wait until it is
gone, wait for a process's exit without polling. Every job and every supervised program runs
in a group of its own, so that stopping it stops everything it started."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import time
from pathlib import Path


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
    wait_group_gone(proc.pid)


def stop_pane_group(pgid: int, grace_s: float) -> None:
    """Like stop_group for a process group gpuq did not spawn itself (a tmux pane)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and group_exists(pgid):
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    wait_group_gone(pgid)


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_group_gone(pgid: int, timeout_s: float = 5.0) -> None:
    """Killed orphans are reaped by init a moment later; report a job stopped only then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and group_exists(pgid):
        time.sleep(0.01)


class ExitWaiter:
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


def stop_groups(procs: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGTERM the process groups led by `procs`, then SIGKILL those still there after
    `grace_s` (shared by the grace period, not given to each in turn)."""
    live = [proc for proc in procs if proc.poll() is None]
    for proc in live:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in live:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def process_identity(pid: int) -> str | None:
    """What a process is beyond its pid: this boot's id and the process's start time (clock
    ticks since boot). A pid reused after the process ended, or after a reboot, reads
    differently; None when there is no such process (or no /proc to ask)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counts from after the command name, which may hold spaces.
    fields = stat[stat.rindex(")") + 2:].split()
    return f"{boot}:{fields[19]}"


def kill_group_if(pid: int, identity: str | None) -> bool:
    """SIGKILL the process group led by `pid` only if its leader is still the process that
    `identity` names; True if it was killed."""
    if identity is None or process_identity(pid) != identity:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
        wait_group_gone(pid)
        return True
    return False


_PR_SET_DUMPABLE = 4


def undumpable() -> bool:
    """Make this process non-dumpable: a process of the same OS account (a job of a named
    user who runs as the stack's account) can then neither read its /proc/PID/environ (the
    database's and Redis's passwords, GPUQ_SECRET) nor trace it or read its memory. Every
    gpuq server process calls it as it starts; jobs it starts are dumpable again (execve
    resets it). False where it could not be set (not Linux)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return bool(prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)
