"""What a supervisor needs so that no process it started outlives it (Linux; elsewhere these
do nothing):

- it is a child subreaper: a process of its tree whose parent died (a job whose GPU worker
  was killed) becomes its child instead of init's, so it can still be found and stopped;
- each child it starts gets SIGTERM when the supervisor dies, even by SIGKILL, and so stops
  in order (a GPU worker stops its job and records how it ended) instead of running on;
- `sweep()` kills whatever is left of its tree once it stopped everything in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

_prctl = None
if sys.platform == "linux":
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl


def become_subreaper() -> bool:
    return _prctl is not None and _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def terminate_with_parent(parent_pid: int) -> None:
    """For a child, between fork and exec: SIGTERM when the parent dies (exit at once if it
    died already)."""
    if _prctl is None:
        return
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            found[int(entry.name)] = int(fields[1])
    return found


def descendants(pid: int | None = None) -> list[int]:
    """Live processes below `pid` (this process by default)."""
    if sys.platform != "linux":
        return []
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], list(children.get(root, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def reap_adopted(own: set[int]) -> None:
    """Collect the exit of children this process adopted (not `own`, whose Popen objects
    collect theirs), so that none stays a zombie."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid in own:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, os.WNOHANG)


@contextlib.contextmanager
def reaping(poll_s: float = 0.05) -> Iterator[None]:
    """While inside, collect adopted children as they exit, from a thread: a process this one
    killed is gone (not a zombie that still counts in its group) as soon as it died. Only
    once this process waited for every child it started itself."""
    done = threading.Event()

    def _loop() -> None:
        while not done.wait(poll_s):
            reap_adopted(set())

    thread = threading.Thread(target=_loop, name="gpuq-reaper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def sweep(timeout_s: float = 10.0) -> list[int]:
    """SIGKILL every process still below this one (and reap them); return their pids."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = descendants()
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            if pid not in killed:
                killed.append(pid)
        reap_adopted(set())
        time.sleep(0.05)
    reap_adopted(set())
    if killed:
        log.warning("killed %d processes left behind: %s", len(killed), killed)
    return killed
