"""Every file gpuq keeps for a job, named in one place.

Under GPUQ_HOME a job has its log (`logs/<id>.log`, every attempt's output), the script and
exit-code file of an attachable (tmux) attempt beside it, and a run directory for a
Python-function job's call and result. Batch backends keep payloads, results and their own
output files in a store directory their nodes can read (`BatchStore`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class JobPaths:
    """The files of one job under one gpuq home."""

    home: Path
    job_id: int

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def log(self) -> Path:
        """stdout and stderr of every attempt, each headed by one `== gpuq:` line."""
        return self.logs_dir / f"{self.job_id}.log"

    @property
    def tmux_script(self) -> Path:
        """What an attachable attempt's tmux session runs."""
        return self.logs_dir / f"{self.job_id}.tmux.sh"

    @property
    def tmux_exit(self) -> Path:
        """The exit code an attachable attempt leaves behind."""
        return self.logs_dir / f"{self.job_id}.exit"

    @property
    def run_dir(self) -> Path:
        return self.home / "run" / str(self.job_id)

    @property
    def call_file(self) -> Path:
        """A Python-function job's call (function and arguments), for the runner."""
        return self.run_dir / "call.pkl"

    @property
    def result_file(self) -> Path:
        """The envelope the runner writes: the function's value or its error."""
        return self.run_dir / "result.pkl"


@dataclass(frozen=True)
class BatchStore:
    """A batch backend's files, under a directory its nodes see (`root`)."""

    root: Path

    def payload(self, key: str) -> Path:
        """A payload too large to pass inline in the job's environment."""
        return self.root / "payloads" / key.replace(":", "_")

    def results(self, launch_id: int | None, job_id: int) -> Path:
        """Where the replicas of one launch (or one lone job) write their envelopes."""
        return self.root / "results" / (str(launch_id) if launch_id is not None else f"j{job_id}")

    def result(self, launch_id: int | None, job_id: int, rank: int) -> Path:
        return self.results(launch_id, job_id) / f"{rank}.pkl"

    def backend_dir(self, backend: str) -> Path:
        """The backend's own files: Slurm's output files, the process backend's state."""
        return self.root / backend


LOG_MODE = 0o600  # a log holds what a job or a server printed: its owner's alone


def open_log(path: Path) -> BinaryIO:
    """A log of gpuq's to append to (a job's, a stack's), made 0600 at creation whatever the
    umask: no moment when another user could open it, as with a chmod after the fact."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, LOG_MODE), "ab")


def private_home(home: Path) -> Path:
    """GPUQ_HOME, made if missing and closed to other users (0700): its database, the
    embedded Redis's data and password, job logs and run files are its owner's, whatever
    the umask. A home another user owns is left as it is."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    found = home.stat()
    if found.st_uid == os.getuid() and found.st_mode & 0o077:
        home.chmod(0o700)
    return home


def kept_secret(path: Path) -> str:
    """A random value kept 0600 at `path` (a password, a token, a key): made on first use,
    written whole under a draft name and linked into place, so that two processes starting
    at once read the same value, never half of one. A copy found open is closed again."""
    if not path.exists():
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32) + "\n")
            os.link(draft, path)
        except FileExistsError:
            pass  # another process made it first; its value is the one
        finally:
            draft.unlink(missing_ok=True)
    if path.stat().st_uid == os.getuid():
        path.chmod(0o600)
    value = path.read_text().strip()
    if not value:
        from app.core.errors import GpuqError

        raise GpuqError(f"{path} is empty: delete it, and gpuq makes a new one")
    return value


# -- an OS account's area in a batch store ---------------------------------------------
#
# A job that runs as its owner's OS account (a named user on a stack run by root) reads its
# payload and secrets and writes its output and result in a directory of that account's own:
# `<store>/users/<user>/`, made by gpuq inside a directory only gpuq may write (0711), so
# that no one but gpuq can replace it, and then given to the account (0700). gpuq, as
# root, never follows a path the account could have bent: it writes a file there only as a
# new one (no link followed, given to the account), and it reads one only when it is a
# plain file the area's account owns, not a link, a pipe or another user's file.

AREA_MODE = 0o700
PASSAGE_MODE = 0o711  # others may pass through to a name they know, not list it


def passage(path: Path) -> Path:
    """A directory gpuq writes and others only pass through (0711), made if missing, with
    the directories it makes on the way to it passages too, whatever the umask."""
    for place in [*reversed(path.parents), path]:
        if not place.exists():
            with contextlib.suppress(FileExistsError):
                place.mkdir(mode=PASSAGE_MODE)
                place.chmod(PASSAGE_MODE)
    found = os.lstat(path)
    if found.st_uid == os.geteuid() and found.st_mode & 0o7777 != PASSAGE_MODE:
        path.chmod(PASSAGE_MODE)
    return path


def unreachable_by_others(path: Path) -> Path | None:
    """The first directory on the way to `path` (it included) that other accounts cannot
    pass through, or None where they can."""
    for place in [*reversed(path.parents), path]:
        if place.exists() and not os.stat(place).st_mode & 0o001:
            return place
    return None


def account_area(users_dir: Path, user: str, uid: int, gid: int) -> Path:
    """`users_dir/<user>`, the account's own (0700), made if missing; given back to the
    account if it belonged to another (the user was added again with another account).
    `users_dir` is gpuq's passage, so nobody else can have put a link in its place."""
    passage(users_dir)
    area = users_dir / user
    with contextlib.suppress(FileExistsError):
        area.mkdir(mode=AREA_MODE)
    found = os.lstat(area)
    if not stat.S_ISDIR(found.st_mode):
        raise OSError(f"{area} is not a directory: remove it")
    if (found.st_uid, found.st_gid) != (uid, gid):
        os.lchown(area, uid, gid)
    if found.st_mode & 0o7777 != AREA_MODE:
        area.chmod(AREA_MODE)
    return area


def give_file(area: Path, name: str, data: bytes, uid: int, gid: int) -> Path:
    """A new 0600 file `name` in `area` holding `data`, owned by the account: whatever was
    there under that name (a link the account made, say) is replaced, never followed."""
    fd_dir = os.open(area, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=fd_dir)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                     dir_fd=fd_dir)
        with os.fdopen(fd, "wb") as f:
            os.fchown(f.fileno(), uid, gid)
            f.write(data)
    finally:
        os.close(fd_dir)
    return area / name


class NotOwned(OSError):
    """A file in an account's area that is not a plain file of that account's."""


@contextlib.contextmanager
def _folder_of(folder: Path, folders: Sequence[str]) -> Iterator[int]:
    """A descriptor of `folder/folders...`, reached without following a link at any step
    (ELOOP or ENOTDIR where one was in the way); closed on leaving."""
    fds = [os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)]
    try:
        for part in folders:
            fds.append(os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                               dir_fd=fds[-1]))
        yield fds[-1]
    finally:
        for fd in fds:
            os.close(fd)


def open_owned(folder: Path, *names: str) -> BinaryIO:
    """`folder/names...` opened for reading, only when it is a plain file owned by whoever
    owns `folder` (gpuq for its own directories, the account for its area), reached without
    following a link below `folder` (a directory gpuq made, which nobody else can replace).
    Raises FileNotFoundError where it is not there and NotOwned where it is something
    else."""
    *folders, name = names
    owner = os.lstat(folder).st_uid
    try:
        with _folder_of(folder, folders) as fd_dir:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd_dir)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotOwned(f"{folder.joinpath(*names)} is reached through a link") from None
        raise
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode) or found.st_uid != owner:
        os.close(fd)
        raise NotOwned(f"{folder.joinpath(*names)} is not a plain file of {folder}'s owner")
    return os.fdopen(fd, "rb")


def area_results(launch_id: int | None, job_id: int) -> str:
    """The folder of a launch's (or a lone job's) envelopes in its owner's area."""
    return f"results.{launch_id if launch_id is not None else f'j{job_id}'}"


def remove_owned(folder: Path, *names: str) -> bool:
    """Remove `folder/names...` if it is there, following no link below `folder`: what an
    account made in its area may be a link, and it is the link that goes. Whether
    something was removed."""
    *folders, name = names
    try:
        with _folder_of(folder, folders) as fd_dir:
            os.unlink(name, dir_fd=fd_dir)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
            return False
        raise
    return True
