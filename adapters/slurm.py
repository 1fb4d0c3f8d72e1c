"""Slurm: sbatch (a launch is an array job), squeue for state, scancel.

Works without Slurm accounting: states come from `squeue`, which knows a job until
MinJobAge after it ends; where the cluster runs slurmdbd (`scontrol show config` says so),
jobs squeue has forgotten are looked up with `sacct`. Payloads over the inline limit,
results, output files and secrets files live in GPUQ_SLURM_SHARED_DIR, which every node
must see.

The cluster is shared: other users' jobs are none of gpuq's business, and their text
(names, working directories) is hostile. gpuq asks only for its own jobs (by id when it
polls; by its accounts when it looks for a tag), reads fields in a fixed order with the one
free-text field last, and ends every record with a token drawn for that call, so that no
job's text can end a record early or pass for another field; a record that does not parse
is logged and skipped.

A job gets no environment from the control worker (`--export=NONE`): the batch script sets
the few variables the runner needs and the job's own, and its secrets go to a 0600 file the
runner reads and deletes before the job starts, never to the script or the environment
Slurm stores.

Where the stack runs as root, a named user's job is submitted as their OS account (`--uid`,
`--gid`, their HOME and USER), and its output, secrets, large payload and result live in
that account's area of the store (app/core/paths.py), which only the account and gpuq may
enter. Such jobs belong to the account on Slurm, so gpuq polls them by id, and it adopts a
job found by its tag only when the job belongs to the account its owner's jobs run as.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shlex
import subprocess
import sys
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from sqlmodel import col, select

from adapters import intent
from adapters.base import BatchAdapter, Status, Submission, SubmitRefused
from app.core import job_env
from app.core.accounts import RunAs, account_environment, os_account
from app.core.durations import parse_signal, slurm_time
from app.core.errors import GpuqError, NoRunAccount
from app.core.identity import stack_owner
from app.core.paths import BatchStore, give_file, remove_owned
from app.core.settings import Settings
from app.store import users
from app.store.models import Job

log = logging.getLogger(__name__)

WAITING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
           "RESV_DEL_HOLD"}
ENDED_WELL = {"COMPLETED"}
CANCELLED = {"CANCELLED"}
# Everything else that has ended (FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, PREEMPTED,
# BOOT_FAIL, DEADLINE) is a failure; a state not named here is a running one.
ENDED_BADLY = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
               "DEADLINE"}
ENDED = ENDED_WELL | CANCELLED | ENDED_BADLY

# squeue's fields for a poll and for finding tags; the last of each is free text.
POLL_FIELDS = ("ArrayJobID", "ArrayTaskID", "State", "exit_code", "Reason", "Name")
TAG_FIELDS = ("ArrayJobID", "ArrayTaskID", "UserName", "Name")
# What Slurm writes in each fixed field; a record with anything else is skipped.
_FIELD_PATTERNS = {"ArrayJobID": re.compile(r"[0-9]+"), "ArrayTaskID": re.compile(r"[0-9]+|N/A"),
                   "State": re.compile(r"[A-Z_]+"), "exit_code": re.compile(r"[0-9]+"),
                   "Reason": re.compile(r"[^\n]*"), "UserName": re.compile(r"[A-Za-z0-9._-]+")}
_SACCT_LINE = re.compile(r"([0-9]+(?:_[0-9]+)?)\|([A-Z_]+)(?: by [0-9]+)?\|([0-9]+):([0-9]+)\|")
# What Slurm gets as a job name or comment: no spaces, `=` or control characters.
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_CHARS = 128


def safe_name(text: str) -> str:
    """`text` as a Slurm job name or comment: only [A-Za-z0-9._-], at most 128 characters."""
    return _UNSAFE_NAME.sub("_", text)[:MAX_NAME_CHARS] or "gpuq"


class SlurmAdapter(BatchAdapter):
    backend_name = "slurm"
    name = "gpuq.batch.slurm"
    # A job's secrets go to a 0600 file its runner reads and removes (never the script).
    carries_secrets = True
    runs_as_owner = True
    area_fix = ("set GPUQ_SLURM_SHARED_DIR to a directory every node sees that other accounts "
                "may pass through (chmod o+x on it and on the directories above it)")

    @classmethod
    def store_dir(cls, settings: Settings) -> Path:
        return (settings.slurm_shared_dir or settings.home) / "batch"

    @classmethod
    def output(cls, settings: Settings, job: Job) -> tuple[Path | None, str | None]:
        if not job.backend_id:
            return None, "Slurm output file, once the job is submitted"
        # A job that ran as its owner's account wrote its output in the owner's area.
        mine = cls.store_dir(settings) / "users" / job.owner / f"{job.backend_id}.out"
        if job.owner and mine.exists():
            return mine, None
        out_dir = BatchStore(cls.store_dir(settings)).backend_dir("slurm")
        return out_dir / f"{job.backend_id}.out", None

    def _run(self, *args: str, env: dict[str, str] | None = None, stdin: str | None = None,
             umask: int = -1) -> str:
        """Run a Slurm command (sbatch gives its job its own `umask`). Not installed:
        SubmitRefused (nothing can have been sent); no answer within call_timeout_s:
        GpuqError (it may have been done)."""
        try:
            done = subprocess.run(args, capture_output=True, text=True, env=env, input=stdin,
                                  timeout=self.call_timeout_s, check=False,
                                  errors="replace", umask=umask)
        except FileNotFoundError:
            raise SubmitRefused(f"{args[0]} is not installed here: run the control worker on "
                                "a Slurm login node (deploy/slurm/setup.sh makes a one-node "
                                "cluster for development)") from None
        except subprocess.TimeoutExpired:
            raise GpuqError(f"{args[0]} did not answer in {self.call_timeout_s:.0f}s") from None
        if done.returncode != 0:
            # Older squeue versions fail when none of the ids asked for is known.
            if args[0] == "squeue" and "invalid job id" in done.stderr.lower():
                return ""
            message = f"{' '.join(args[:2])} failed: {done.stderr.strip()}"
            # sbatch's own time-outs talking to the controller leave its fate unknown.
            if args[0] == "sbatch" and "timed out" not in done.stderr.lower():
                raise SubmitRefused(message)
            raise GpuqError(message)
        return done.stdout

    def _squeue(self, fields: Sequence[str], *filters: str) -> list[list[str]]:
        """One record of `fields` per job or array task that `filters` select (gpuq's own
        jobs: its ids, or its accounts)."""
        end = f"@{secrets.token_hex(16)}@"
        spec = ",".join([f"{f}:|" for f in fields[:-1]] + [f"{fields[-1]}:{end}"])
        text = self._run("squeue", "--noheader", "--array", "--states=all",
                         f"--Format={spec}", *filters)
        return records(text, end, fields)

    @cached_property
    def config(self) -> dict[str, str]:
        lines = self._run("scontrol", "show", "config").splitlines()
        return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in lines) if v}

    def array_limit(self) -> int:
        return int(self.config.get("MaxArraySize", "1001"))  # indices stay below it

    def submit(self, submission: Submission) -> str:
        """One sbatch: an array when the part has several replicas. The job name is the
        submission's tag; the user's name, made safe, goes in the comment. A named user's
        job is submitted as their account (root only), its files in their area."""
        account, part = submission.account, submission.jobs
        out_dir = self._out_dir(submission)
        command = self._sbatch(submission)
        # The job inherits only job_env's allow-list from the control worker: no GPUQ_*,
        # no URLs or passwords; a named user's job has their HOME and USER.
        env = {**job_env.inherited(os.environ), **submission.env,
               "GPUQ_RANK_OFFSET": str(part[0].rank)}
        if account is not None:
            env = account_environment(account, env)
        if len(part) == 1:
            env.update(GPUQ_JOB_RANK=str(part[0].rank), GPUQ_JOB_ID=str(part[0].id))
            array = [f"--output={out_dir}/%j.out"]
        else:
            array = [f"--array=0-{len(part) - 1}", f"--output={out_dir}/%A_%a.out"]
        secret_files = self._secret_files(submission.tag, len(part), submission.secrets,
                                          None if account is None else (out_dir, account))
        python = self.rt.settings.batch_python or sys.executable
        try:
            handle = self._run(*command, *array, stdin=_script(env, secret_files, python),
                               umask=-1 if account is None else account.umask)
        except SubmitRefused:
            for path in secret_files:
                path.unlink(missing_ok=True)
            raise
        return handle.strip().split(";")[0]

    def _out_dir(self, submission: Submission) -> Path:
        """Where the replicas' output files go: Slurm's folder of the store, or the area of
        the account they run as (made here; where it cannot be, nothing is submitted)."""
        if submission.account is None:
            out_dir = BatchStore(self.store_dir(self.rt.settings)).backend_dir("slurm")
            out_dir.mkdir(parents=True, exist_ok=True)
            return out_dir
        try:
            return self.area(submission.jobs[0], submission.account)
        except (GpuqError, OSError) as e:
            raise SubmitRefused(str(e)) from None

    def _sbatch(self, submission: Submission) -> list[str]:
        """sbatch with the options every replica of `submission` shares."""
        settings, account = self.rt.settings, submission.account
        command = ["sbatch", "--parsable", "--export=NONE",
                   f"--job-name={safe_name(submission.tag)}",
                   f"--comment={safe_name(submission.name)}"]
        if account is not None:
            command += [f"--uid={account.uid}", f"--gid={account.gid}"]
        for option, value in (("partition", settings.slurm_partition),
                              ("account", settings.slurm_account),
                              ("time", slurm_time(submission.jobs[0].time_limit_s)
                               if submission.jobs[0].time_limit_s else settings.slurm_time_limit),
                              ("chdir", submission.workdir or (account and account.home))):
            if value:
                command.append(f"--{option}={value}")
        if submission.gpus:
            command.append(f"--gpus={submission.gpus}" if settings.slurm_gpu_option == "gpus"
                           else f"--gres=gpu:{submission.gpus}")
        if submission.jobs[0].signal and submission.jobs[0].time_limit_s:
            # to the batch shell, which is the runner (the script execs it): it passes the
            # signal on to the job's process group
            name, seconds = parse_signal(submission.jobs[0].signal)
            command.append(f"--signal=B:{name}@{seconds}")
        return command

    def secrets_dir(self) -> Path:
        return BatchStore(self.store_dir(self.rt.settings)).backend_dir("slurm") / "secrets"

    def _secret_files(self, tag: str, count: int, values: dict[str, str],
                      area: tuple[Path, RunAs] | None = None) -> list[Path]:
        """One 0600 file per replica (each runner deletes its own): NAME=VALUE records
        separated by NUL, which no variable holds. Gpuq's own when the job runs as the
        stack's account; the account's, in its area, when it runs as a named user's."""
        if not values:
            return []
        data = b"\0".join(f"{k}={v}".encode(errors="surrogateescape")
                          for k, v in values.items())
        if area is not None:
            folder, account = area
            return [give_file(folder, f"secrets.{safe_name(tag)}.{index}", data, account.uid,
                              account.gid) for index in range(count)]
        folder = self.secrets_dir()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
        paths = [folder / f"{safe_name(tag)}.{index}" for index in range(count)]
        for path in paths:
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return paths

    def _drop_secrets(self, name: str, index: str) -> None:
        """The secrets file a replica's runner never took (it never started)."""
        (self.secrets_dir() / f"{safe_name(name)}.{index}").unlink(missing_ok=True)
        if self.users_dir().is_dir():
            for area in self.users_dir().iterdir():
                remove_owned(area, f"secrets.{safe_name(name)}.{index}")

    def member_ids(self, handle: str, count: int) -> list[str]:
        return [handle] if count == 1 else [f"{handle}_{index}" for index in range(count)]

    def tagged(self) -> dict[str, str]:
        """gpuq's jobs by their name (a tag); an array's handle is its id. A job is gpuq's
        only when it belongs to the account its tag's job runs as: the stack's, or its
        owner's (whose other jobs are theirs, not gpuq's)."""
        stack = stack_owner().name
        with self.rt.engine.connect() as conn:
            accounts = {name for name in conn.execute(select(users.USERS.c.os_user).where(
                col(users.USERS.c.os_user).is_not(None))).scalars() if os_account(name)}
        found, owners = {}, {}
        for parent, _, user, name in self._squeue(
                TAG_FIELDS, f"--users={','.join(sorted({stack, *accounts}))}"):
            if (parsed := intent.parse(self.install, name)) is not None:
                found[name] = (parent, user, parsed[0])
        if any(user != stack for _, user, _ in found.values()):
            with self.rt.session() as session:
                owners = dict(session.execute(select(Job.id, Job.owner).where(col(Job.id).in_(
                    [first for _, _, first in found.values()]))).all())
        mine = {}
        for name, (parent, user, first) in found.items():
            if user == stack or user == self._account_name(owners.get(first)):
                mine[name] = parent
            else:
                log.warning("slurm: job %s of %s is named like gpuq's job %s, which does not "
                            "run as %s: not adopted", parent, user, first, user)
        return mine

    def _account_name(self, owner: str | None) -> str | None:
        """The OS account `owner`'s jobs run as on Slurm, where it is another account."""
        if owner is None:
            return None
        try:
            account = users.run_as(self.rt.engine, owner)
        except NoRunAccount:
            return None
        return account.name if account is not None else None

    def poll(self, backend_ids: Sequence[str]) -> dict[str, Status]:
        """One `squeue` for the jobs asked about; `sacct` for those it has forgotten when
        accounting is there."""
        statuses: dict[str, Status] = {}
        parents = sorted({i.split("_")[0] for i in backend_ids})
        for parent, task, state, wait_status, reason, name in self._squeue(
                POLL_FIELDS, f"--jobs={','.join(parents)}"):  # by id: its own, any account
            backend_id = parent if task == "N/A" else f"{parent}_{task}"
            status = int(wait_status)
            statuses[backend_id] = _status(state, reason, f"{status >> 8}:{status & 0x7F}")
            if state in ENDED:  # a runner that never started leaves its secrets: drop them
                self._drop_secrets(name, "0" if task == "N/A" else task)
        forgotten = [i for i in backend_ids if i not in statuses]
        if forgotten and self.config.get("AccountingStorageType", "").endswith("slurmdbd"):
            text = self._run("sacct", "--noheader", "--parsable2", "-X",
                             "--format=JobID,State,ExitCode,Reason",
                             f"--jobs={','.join(forgotten)}")
            for line in text.splitlines():
                if not (match := _SACCT_LINE.match(line)):
                    log.warning("slurm: skipped an sacct line that does not parse: %r",
                                line[:200])
                    continue
                job_id, state, code, signal = match.groups()
                statuses[job_id] = _status(state, line[match.end():], f"{code}:{signal}")
        return {i: statuses[i] for i in backend_ids if i in statuses}

    def cancel(self, backend_ids: Sequence[str]) -> None:
        self._run("scancel", *backend_ids)


def _script(env: dict[str, str], secret_files: list[Path], python: str) -> str:
    """The batch script: the runner with exactly `env` (and SLURM_*), and where each
    replica finds its secrets. Names and values are quoted; the script holds no secret."""
    lines = ["#!/bin/sh", "exec /usr/bin/env -- \\"]
    lines += [f"  {shlex.quote(f'{k}={v}')} \\" for k, v in env.items()]
    if secret_files:
        folder = shlex.quote(str(secret_files[0].parent))
        stem = shlex.quote(secret_files[0].name.rsplit(".", 1)[0])
        lines.append(f'  GPUQ_SECRETS_FILE={folder}/{stem}."${{SLURM_ARRAY_TASK_ID:-0}}" \\')
    lines.append(f"  {shlex.quote(python)} -m adapters.runner")
    return "\n".join(lines) + "\n"


def records(text: str, end: str, fields: Sequence[str]) -> list[list[str]]:
    """squeue's answer as records of `fields`. Each record ends with `end` (drawn per
    call, so no job's text holds it); fields are split at the first count-1 `|`, so the last
    one, the only free text, keeps any `|` or newline it has. A record whose fixed fields
    are not what Slurm writes is logged and skipped."""
    found = []
    for chunk in text.split(end)[:-1]:
        values = chunk.removeprefix("\n").split("|", len(fields) - 1)
        if len(values) == len(fields) and all(
                pattern.fullmatch(value) for field, value in zip(fields, values, strict=True)
                if (pattern := _FIELD_PATTERNS.get(field))):
            found.append(values)
        else:
            log.warning("slurm: skipped a squeue record that does not parse: %r", chunk[:200])
    return found


def _status(state: str, reason: str | None, exit_code: str | None) -> Status:
    """Slurm's job state onto the contract's; ExitCode is `code:signal`."""
    code, _, signal = (exit_code or "0:0").partition(":")
    exit_status = int(code) or (128 + int(signal) if signal and int(signal) else 0)
    reason = None if reason in (None, "", "None") else reason
    if state in WAITING:
        return Status("pending", f"{state}: {reason}" if reason else state)
    if state in ENDED_WELL:
        return Status("succeeded", None, exit_status)
    if state in CANCELLED:
        return Status("cancelled", "cancelled on Slurm", exit_status)
    if state == "TIMEOUT":
        return Status("timeout", "reached its time limit (TIMEOUT on Slurm)", exit_status)
    if state in ENDED_BADLY:
        why = f"{state} on Slurm" + (f": {reason}" if reason else "")
        return Status("failed", why, exit_status)
    return Status("running")
