"""A job is everything it started: each attempt runs in a container of its own, which the
worker empties (SIGKILL to every process in it, then waits until none is left) when the
job ends, is cancelled, runs out of lease or is stopped: a daemon the job left behind
(`setsid -f`) is gone before its GPUs go to another job.

The container is the best this host offers, chosen once per worker process:
- a cgroup v2 (where cgroup2 is mounted and the worker may make cgroups): `cgroup.kill`
  empties it at once (Linux 5.14), `cgroup.events` says when it is empty, `cpu.stat` and
  `memory.peak` give its use;
- else a cgroup in the v1 `pids` hierarchy, emptied by killing what `cgroup.procs` lists
  until nothing is;
- else the processes that carry the attempt's mark in their environment (GPUQ_JOB_ID and
  GPUQ_ATTEMPT, which every job sees): a process that rewrote its environment escapes it.
Beside a cgroup v2 without the memory controller, a v1 `memory` cgroup reads the peak.

A process joins before the job's program starts: the job's argv is prefixed by a shell
that writes its own pid into the cgroup (as root, before any change of user), then execs
the rest, so nothing the job starts is ever outside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
DIR = "gpuq-jobs"  # under the worker's own cgroup, in each hierarchy it uses
JOIN = 'echo $$ > "$1" && shift && exec "$@"'
EMPTY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Usage:
    cpu_s: float | None
    peak_memory_mb: int | None


class Container:
    """The processes of one attempt."""

    def prefix(self) -> list[str]:
        """What runs before the job's argv so that the job starts inside."""
        return [arg for path in self.join_files()
                for arg in ("/bin/sh", "-c", JOIN, "sh", str(path))]

    def join_files(self) -> list[Path]:
        """The files a process writes its pid into to come inside (none: it is inside by
        its mark)."""
        return []

    def kill_all(self) -> bool:
        """SIGKILL every process inside and wait until none is left; False when some
        process outlived EMPTY_TIMEOUT_S."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        """The processes inside now."""
        raise NotImplementedError

    def terminate(self) -> None:
        """SIGTERM every process inside, once: a job stopped with a grace period (at its
        time limit, cancelled) may save its work in each of them, those that left its
        process group (`setsid`) included; kill_all ends what is left after the grace."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)

    def usage(self) -> Usage:
        return Usage(None, None)

    def close(self) -> None:
        """Remove what the container left on the host (after kill_all)."""


class Cgroup(Container):
    """A cgroup v2 or v1 `pids` cgroup, with a v1 `memory` cgroup beside it when needed."""

    def __init__(self, path: Path, v2: bool, memory: Path | None) -> None:
        self.path, self.v2, self.memory = path, v2, memory

    def join_files(self) -> list[Path]:
        return [directory / "cgroup.procs" for directory in filter(None, (self.path,
                                                                          self.memory))]

    def pids(self) -> list[int]:
        try:
            text = (self.path / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(line) for line in text.split()]

    def empty(self) -> bool:
        if self.v2:
            with contextlib.suppress(FileNotFoundError):
                return "populated 0" in (self.path / "cgroup.events").read_text()
            return True
        return not self.pids()

    def kill_all(self) -> bool:
        deadline = time.monotonic() + EMPTY_TIMEOUT_S
        while not self.empty():
            if self.v2 and (self.path / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    (self.path / "cgroup.kill").write_text("1")
            else:
                for pid in self.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                log.error("cgroup %s still holds %s after SIGKILL", self.path, self.pids())
                return False
            time.sleep(0.01)
        return True

    def usage(self) -> Usage:
        cpu_s = peak = None
        with contextlib.suppress(OSError, ValueError):
            if self.v2:
                stat = dict(line.split() for line in
                            (self.path / "cpu.stat").read_text().splitlines())
                cpu_s = int(stat["usage_usec"]) / 1e6
        for path in (self.path / "memory.peak", self.memory and
                     self.memory / "memory.max_usage_in_bytes"):
            if path and peak is None:
                with contextlib.suppress(OSError, ValueError):
                    peak = int(Path(path).read_text()) // 2**20
        return Usage(cpu_s, peak)

    def close(self) -> None:
        for directory in filter(None, (self.path, self.memory)):
            with contextlib.suppress(OSError):
                directory.rmdir()


class Marked(Container):
    """The processes whose environment holds the attempt's mark."""

    def __init__(self, job_id: int, attempt: int) -> None:
        self.marks = (f"GPUQ_JOB_ID={job_id}".encode(), f"GPUQ_ATTEMPT={attempt}".encode())

    def pids(self) -> list[int]:
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                entries = (proc / "environ").read_bytes().split(b"\0")
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and all(mark in entries for mark in self.marks):
                found.append(int(proc.name))
        return found

    def kill_all(self) -> bool:
        deadline = time.monotonic() + EMPTY_TIMEOUT_S
        while pids := self.pids():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


def contain(job_id: int, attempt: int, host: str) -> Container:
    """The container of one attempt, of the best kind this host offers (made here)."""
    name = f"{_safe(host)}-{job_id}-{attempt}"
    kind = _kind()
    if kind is not None:
        base, v2 = kind
        memory = _memory_base() if v2 and not _v2_memory(base) else None
        path = base / name
        try:
            path.mkdir(parents=True, exist_ok=True)
            if memory is not None:
                memory = memory / name
                memory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning("job %s: no cgroup (%s); it is tracked by its mark", job_id, e)
        else:
            return Cgroup(path, v2, memory)
    return Marked(job_id, attempt)


def left_by(job_id: int, attempt: int, host: str) -> Container:
    """The container of an attempt a worker that died left behind (made by `contain`), for
    the worker that starts again to empty it."""
    name = f"{_safe(host)}-{job_id}-{attempt}"
    kind = _kind()
    if kind is not None and (kind[0] / name).is_dir():
        memory = _memory_base() if kind[1] else None
        return Cgroup(kind[0] / name, kind[1],
                      memory / name if memory and (memory / name).is_dir() else None)
    return Marked(job_id, attempt)


def sweep(host: str, older_than_s: float = 60.0) -> int:
    """Remove this host's empty job cgroups made more than `older_than_s` ago: those of
    attempts whose worker was killed and whose jobs were settled elsewhere. A cgroup that
    holds a process cannot be removed; one made a moment ago, whose job is about to join
    it, is left alone. Returns how many were removed."""
    kind = _kind()
    if kind is None:
        return 0
    memory = _memory_base() if kind[1] else None
    bases = [kind[0], *([memory] if memory is not None else [])]
    removed, now = 0, time.time()
    for base in bases:
        for directory in base.glob(f"{_safe(host)}-*-*"):
            with contextlib.suppress(OSError):
                if now - directory.stat().st_mtime > older_than_s:
                    directory.rmdir()
                    removed += 1
    return removed


def kind_name() -> str:
    """Which container this worker gives its jobs, for its log and `gpuq status`."""
    kind = _kind()
    if kind is None:
        return "marked processes"
    return f"cgroup {'v2' if kind[1] else 'v1 pids'} {kind[0]}"


@cache
def _kind() -> tuple[Path, bool] | None:
    """The directory this worker's job cgroups go in, and whether it is cgroup v2: the
    first where a process can be made to join a cgroup, tried for real once."""
    for base, v2 in ((_v2_base(), True), (_v1_base("pids"), False)):
        if base is not None and _can_join(base):
            return base, v2
    return None


@cache
def _memory_base() -> Path | None:
    """Where a v1 `memory` cgroup of each job goes, beside a cgroup v2 that has no memory
    controller; None where a process cannot join one."""
    base = _v1_base("memory")
    return base if base is not None and _can_join(base) else None


def _v2_base() -> Path | None:
    mount = next((Path(fields[1]) for fields in _mounts() if fields[2] == "cgroup2"), None)
    own = _own_cgroups().get("")
    return None if mount is None or own is None else mount / own.lstrip("/") / DIR


def _v1_base(controller: str) -> Path | None:
    mount = next((Path(fields[1]) for fields in _mounts() if fields[2] == "cgroup"
                  and controller in fields[3].split(",")), None)
    own = _own_cgroups().get(controller)
    return None if mount is None or own is None else mount / own.lstrip("/") / DIR


def _v2_memory(base: Path) -> bool:
    with contextlib.suppress(OSError):
        return "memory" in (base / "cgroup.subtree_control").read_text().split()
    return False


def _can_join(base: Path) -> bool:
    probe = base / f"probe-{os.getpid()}"
    try:
        probe.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["/bin/sh", "-c", JOIN, "sh", str(probe / "cgroup.procs"),
                               "true"], capture_output=True, timeout=30)
        return done.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


def _mounts() -> list[list[str]]:
    try:
        return [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return []


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup per v1 controller, and under "" its cgroup v2."""
    own: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return own
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path
    return own


def _safe(host: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in host)
