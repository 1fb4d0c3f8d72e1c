"""The reference batch backend: each replica is a runner process on this host.

It is the contract's executable specification and the fake the contract tests run: no
queueing of its own (every submitted job starts), a job's state read from its process
and the exit-code file its wrapper writes. A job's time limit is kept by a watcher beside
it, in a session of its own: at the limit it marks the job timed out and stops its process
group (SIGTERM, SIGKILL after GPUQ_KILL_WAIT_S), as a backend's own time-out does.
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
from app.core.durations import format_duration
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
        if job.time_limit_s:
            script += " " + _watcher(base, job.time_limit_s, self.rt.settings.kill_wait_s)
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
        timed_out = Path(f"{backend_id}.timeout")
        if exit_file.exists() or (timed_out.exists() and not self._running(pgid_file)):
            code = int(exit_file.read_text().strip() or 1) if exit_file.exists() else 137
            if Path(f"{backend_id}.cancel").exists():
                return Status("cancelled", "cancelled by user", code)
            if timed_out.exists():
                return Status("timeout", f"reached its time limit of "
                              f"{timed_out.read_text().strip()}", code)
            return Status("succeeded" if code == 0 else "failed", None, code)
        if self._running(pgid_file):
            return Status("running")
        if Path(f"{backend_id}.cancel").exists():  # the SIGTERM took the wrapper with it
            return Status("cancelled", "cancelled by user", 143)
        return Status("missing")

    @staticmethod
    def _running(pgid_file: Path) -> bool:
        return pgid_file.exists() and group_exists(int(pgid_file.read_text()))

    def cancel(self, backend_ids: Sequence[str]) -> None:
        for backend_id in backend_ids:
            Path(f"{backend_id}.cancel").touch()
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
                os.killpg(int(Path(f"{backend_id}.pgid").read_text()), signal.SIGTERM)



def _watcher(base: Path, limit_s: int, kill_wait_s: float) -> str:
    """The shell that keeps a job's time limit: in a session of its own (not the job's
    group, which it stops), it looks each second until the job ended or its limit came;
    then it writes the limit into `<base>.timeout` and stops the job's group (the wrapper
    shell's id, `$$`)."""
    quoted = {ext: shlex.quote(f"{base}.{ext}") for ext in ("exit", "timeout")}
    # The group is gone (cancelled) or the job ended: nothing to stop, and a group id
    # reused since must never be signalled.
    live = f"[ ! -e {quoted['exit']} ] && kill -0 -- -$0 2>/dev/null"
    body = (f"end=$((SECONDS + {limit_s})); "
            f"while {live} && [ $SECONDS -lt $end ]; do sleep 1; done; "
            f"{live} || exit 0; "
            f"echo {shlex.quote(format_duration(limit_s))} > {quoted['timeout']}; "
            f"kill -TERM -- -$0 2>/dev/null; "
            f"w=$((SECONDS + {max(1, round(kill_wait_s))})); "
            f"while {live} && [ $SECONDS -lt $w ]; do sleep 1; done; "
            f"{live} && kill -KILL -- -$0 2>/dev/null; exit 0")
    return f"setsid bash -c {shlex.quote(body)} $$ </dev/null >/dev/null 2>&1 &"
