"""One host supervisor per host: `gpuq worker` and `gpuq up` hold an OS lock for their life.

A second one for the same host would start GPU workers that take the first one's running
jobs for orphans and kill them. The lock is an flock on `GPUQ_HOME/hosts/HOST.lock`: the
kernel drops it with the last process that holds it, so a holder killed by SIGKILL never
leaves it behind.

The supervisor's children inherit the lock's open file (its descriptor number in
GPUQ_HOST_LOCK_FD): `gpuq worker` run by `gpuq up` takes the lock through it, where a fresh
open of the file would be refused; and while any process of a stack lives (a GPU worker
still stopping its job after its parent was killed) a second stack stays refused.

The lock guards one machine's GPUQ_HOME. Two machines that claim the same GPUQ_HOSTNAME
with different homes are not seen by it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from app.core.errors import HostAlreadyRunning
from app.core.settings import Settings

LOCK_FD_ENV = "GPUQ_HOST_LOCK_FD"


def lock_path(settings: Settings) -> Path:
    return settings.home / "hosts" / f"{settings.hostname}.lock"


def _inherited(path: Path) -> int | None:
    """The lock's descriptor handed down by the supervisor that started this process, if
    it really is an open file of this lock (not just a number in the environment)."""
    raw = os.environ.get(LOCK_FD_ENV)
    if not raw or not raw.isdigit():
        return None
    fd = int(raw)
    try:
        held, wanted = os.fstat(fd), os.stat(path)
    except OSError:
        return None
    if (held.st_dev, held.st_ino) != (wanted.st_dev, wanted.st_ino):
        return None
    return fd


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError):
        pid = path.read_text().strip()
        if pid.isdigit():
            return pid
    return "unknown"


class HostLock:
    """Held from `acquire()` until this process and every child that inherited it are gone."""

    def __init__(self, settings: Settings, what: str) -> None:
        self.settings = settings
        self.what = what  # "gpuq worker" or "gpuq up", for the refusal
        self.path = lock_path(settings)
        self.fd: int | None = None

    def acquire(self) -> int:
        """Take the lock or refuse with one line naming its holder; return its descriptor."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = _inherited(self.path)
        if fd is not None:
            # Shared with the parent supervisor that holds it: this flock succeeds on the
            # same open file and is refused to everyone else.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.fd = fd
                return fd
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _holder(self.path)
            raise HostAlreadyRunning(
                f"host {self.settings.hostname} already runs its GPU workers (pid {holder}, "
                f"GPUQ_HOME={self.settings.home}): stop it first (Ctrl-C where it runs, or "
                f"kill -TERM {holder}), or set another GPUQ_HOSTNAME") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return fd

    def child_env(self) -> dict[str, str]:
        """What a supervised child needs to share this lock (with the descriptor passed)."""
        return {LOCK_FD_ENV: str(self.fd)} if self.fd is not None else {}
