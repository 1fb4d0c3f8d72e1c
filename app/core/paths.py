"""Every file gpuq keeps for a job, named in one place.

Under GPUQ_HOME a job has its log (`logs/<id>.log`, every attempt's output), the script and
exit-code file of an attachable (tmux) attempt beside it, and a run directory for a
Python-function job's call and result. Batch backends keep payloads, results and their own
output files in a store directory their nodes can read (`BatchStore`).
"""

from __future__ import annotations

import os
import secrets
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
