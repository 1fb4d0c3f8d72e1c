"""The reference batch backend: each replica is a runner process on this host.

It is the contract's executable specification and the fake the contract tests run: no
queueing of its own (every submitted job starts), a job's state read from its process
and the exit-code file its wrapper writes.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from adapters.base import BatchAdapter, Status, Submission
from app.core.accounts import account_environment, as_account
from app.core.job_env import job_environment
from app.core.paths import BatchStore, JobPaths, open_log
from app.core.procgroup import group_exists


class ProcessAdapter(BatchAdapter):
    backend_name = "process"
    name = "gpuq.batch.process"
    carries_secrets = True
    runs_as_owner = True
    area_fix = "GPUQ_HOME is closed to other accounts; run their jobs with --backend local"

    def _state_dir(self) -> Path:
        path = BatchStore(self.store_dir(self.rt.settings)).backend_dir("process")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def submit(self, submission: Submission) -> str:
        """One replica (array_limit is 1), its files named by the submission's tag."""
        (job,) = submission.jobs
        base = self._state_dir() / submission.tag
        # Like every backend's: an allow-list of this worker's environment, never its
        # GPUQ_* settings; the secrets live in the runner's environment only.
        env = job_environment(submission.env, {"GPUQ_JOB_ID": str(job.id),
                                               "GPUQ_JOB_RANK": str(job.rank)},
                              submission.secrets)
        # As its owner's OS account where this stack runs as root (app/store/users.py
        # `run_as`); the wrapper, which writes the exit file, stays the stack's.
        account = submission.account
        if account is not None:
            env = account_environment(account, env)
        runner = shlex.join([*(as_account(account) if account else []),
                             self.rt.settings.batch_python or sys.executable, "-m",
                             "adapters.runner"])
        # The wrapper keeps the exit code where poll() finds it after the process is gone;
        # it runs in the background of a shell that exits at once, so that the job is
        # nobody's child (no zombies) while its process group keeps the shell's id.
        script = f"({runner}; echo $? > {shlex.quote(str(base))}.exit) &"
        assert job.id is not None
        log_path = JobPaths(self.rt.settings.home, job.id).log
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open_log(log_path) as log:
            proc = subprocess.Popen(["bash", "-c", script], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=submission.workdir or None, start_new_session=True,
                                    umask=account.umask if account else -1)
        Path(f"{base}.pgid").write_text(str(proc.pid))  # first: tagged() finds it by this
        proc.wait()
        return str(base)

    def member_ids(self, handle: str, count: int) -> list[str]:
        return [handle]

    def tagged(self) -> dict[str, str]:
        return {path.name.removesuffix(".pgid"): str(path).removesuffix(".pgid")
                for path in self._state_dir().glob("*.pgid")}

    def poll(self, backend_ids: Sequence[str]) -> dict[str, Status]:
        return {backend_id: self._status(backend_id) for backend_id in backend_ids}

    def _status(self, backend_id: str) -> Status:
        exit_file, pgid_file = Path(f"{backend_id}.exit"), Path(f"{backend_id}.pgid")
        if exit_file.exists():
            code = int(exit_file.read_text().strip() or 1)
            if Path(f"{backend_id}.cancel").exists():
                return Status("cancelled", "cancelled by user", code)
            return Status("succeeded" if code == 0 else "failed", None, code)
        if pgid_file.exists() and group_exists(int(pgid_file.read_text())):
            return Status("running")
        if Path(f"{backend_id}.cancel").exists():  # the SIGTERM took the wrapper with it
            return Status("cancelled", "cancelled by user", 143)
        return Status("missing")

    def cancel(self, backend_ids: Sequence[str]) -> None:
        for backend_id in backend_ids:
            Path(f"{backend_id}.cancel").touch()
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
                os.killpg(int(Path(f"{backend_id}.pgid").read_text()), signal.SIGTERM)

