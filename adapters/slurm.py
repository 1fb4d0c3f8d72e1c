"""Slurm: sbatch (a launch is an array job), squeue for state, scancel.

Works without Slurm accounting: states come from `squeue`, which knows a job until
MinJobAge after it ends; where the cluster runs slurmdbd (`scontrol show config` says so),
jobs squeue has forgotten are looked up with `sacct`. Payloads over the inline limit,
results, output files and secrets files live in GPUQ_SLURM_SHARED_DIR, which every node
must see.

The cluster is shared: other users' jobs are none of gpuq's business, and their text
(names, working directories) is hostile. gpuq asks only for its own jobs (`--me`, and by id
when it polls), reads fields in a fixed order with the one free-text field last, and ends
every record with a token drawn for that call, so that no job's text can end a record early
or pass for another field; a record that does not parse is logged and skipped.

A job gets no environment from the control worker (`--export=NONE`): the batch script sets
the few variables the runner needs and the job's own, and its secrets go to a 0600 file the
runner reads and deletes before the job starts, never to the script or the environment
Slurm stores.
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

from adapters.base import BatchAdapter, Status, Submission, SubmitRefused
from app.core import job_env
from app.core.errors import GpuqError
from app.core.paths import BatchStore
from app.core.settings import Settings
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
TAG_FIELDS = ("ArrayJobID", "ArrayTaskID", "Name")
# What Slurm writes in each fixed field; a record with anything else is skipped.
_FIELD_PATTERNS = {"ArrayJobID": re.compile(r"[0-9]+"), "ArrayTaskID": re.compile(r"[0-9]+|N/A"),
                   "State": re.compile(r"[A-Z_]+"), "exit_code": re.compile(r"[0-9]+"),
                   "Reason": re.compile(r"[^\n]*")}
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

    @classmethod
    def store_dir(cls, settings: Settings) -> Path:
        return (settings.slurm_shared_dir or settings.home) / "batch"

    @classmethod
    def output(cls, settings: Settings, job: Job) -> tuple[Path | None, str | None]:
        if not job.backend_id:
            return None, "Slurm output file, once the job is submitted"
        out_dir = BatchStore(cls.store_dir(settings)).backend_dir("slurm")
        return out_dir / f"{job.backend_id}.out", None

    def _run(self, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
             ) -> str:
        """Run a Slurm command. Not installed: SubmitRefused (nothing can have been sent);
        no answer within call_timeout_s: GpuqError (it may have been done)."""
        try:
            done = subprocess.run(args, capture_output=True, text=True, env=env, input=stdin,
                                  timeout=self.call_timeout_s, check=False,
                                  errors="replace")
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
        """gpuq's own jobs (`--me`), one record of `fields` per job or array task."""
        end = f"@{secrets.token_hex(16)}@"
        spec = ",".join([f"{f}:|" for f in fields[:-1]] + [f"{fields[-1]}:{end}"])
        text = self._run("squeue", "--me", "--noheader", "--array", "--states=all",
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
        submission's tag; the user's name, made safe, goes in the comment."""
        settings = self.rt.settings
        out_dir = BatchStore(self.store_dir(settings)).backend_dir("slurm")
        out_dir.mkdir(parents=True, exist_ok=True)
        part = submission.jobs
        command = ["sbatch", "--parsable", "--export=NONE",
                   f"--job-name={safe_name(submission.tag)}",
                   f"--comment={safe_name(submission.name)}"]
        for option, value in (("partition", settings.slurm_partition),
                              ("account", settings.slurm_account),
                              ("time", settings.slurm_time_limit),
                              ("chdir", submission.workdir)):
            if value:
                command.append(f"--{option}={value}")
        if submission.gpus:
            command.append(f"--gpus={submission.gpus}" if settings.slurm_gpu_option == "gpus"
                           else f"--gres=gpu:{submission.gpus}")
        # The job inherits only job_env's allow-list from the control worker: no GPUQ_*,
        # no URLs or passwords.
        env = {**job_env.inherited(os.environ), **submission.env,
               "GPUQ_RANK_OFFSET": str(part[0].rank)}
        if len(part) == 1:
            env.update(GPUQ_JOB_RANK=str(part[0].rank), GPUQ_JOB_ID=str(part[0].id))
            array = [f"--output={out_dir}/%j.out"]
        else:
            array = [f"--array=0-{len(part) - 1}", f"--output={out_dir}/%A_%a.out"]
        secret_files = self._secret_files(submission.tag, len(part), submission.secrets)
        try:
            handle = self._run(*command, *array, stdin=_script(env, secret_files))
        except SubmitRefused:
            for path in secret_files:
                path.unlink(missing_ok=True)
            raise
        return handle.strip().split(";")[0]

    def secrets_dir(self) -> Path:
        return BatchStore(self.store_dir(self.rt.settings)).backend_dir("slurm") / "secrets"

    def _secret_files(self, tag: str, count: int, values: dict[str, str]) -> list[Path]:
        """One 0600 file per replica (each runner deletes its own): NAME=VALUE records
        separated by NUL, which no variable holds."""
        if not values:
            return []
        folder = self.secrets_dir()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
        data = b"\0".join(f"{k}={v}".encode(errors="surrogateescape")
                          for k, v in values.items())
        paths = [folder / f"{safe_name(tag)}.{index}" for index in range(count)]
        for path in paths:
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return paths

    def member_ids(self, handle: str, count: int) -> list[str]:
        return [handle] if count == 1 else [f"{handle}_{index}" for index in range(count)]

    def tagged(self) -> dict[str, str]:
        """gpuq's jobs by their name (a tag); an array's handle is its id."""
        found = {}
        for parent, _, name in self._squeue(TAG_FIELDS):
            if name.startswith("gpuq-"):
                found[name] = parent
        return found

    def poll(self, backend_ids: Sequence[str]) -> dict[str, Status]:
        """One `squeue` for the jobs asked about; `sacct` for those it has forgotten when
        accounting is there."""
        statuses: dict[str, Status] = {}
        parents = sorted({i.split("_")[0] for i in backend_ids})
        for parent, task, state, wait_status, reason, name in self._squeue(
                POLL_FIELDS, f"--jobs={','.join(parents)}"):
            backend_id = parent if task == "N/A" else f"{parent}_{task}"
            status = int(wait_status)
            statuses[backend_id] = _status(state, reason, f"{status >> 8}:{status & 0x7F}")
            if state in ENDED:  # a runner that never started leaves its secrets: drop them
                index = "0" if task == "N/A" else task
                (self.secrets_dir() / f"{safe_name(name)}.{index}").unlink(missing_ok=True)
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


def _script(env: dict[str, str], secret_files: list[Path]) -> str:
    """The batch script: the runner with exactly `env` (and SLURM_*), and where each
    replica finds its secrets. Names and values are quoted; the script holds no secret."""
    lines = ["#!/bin/sh", "exec /usr/bin/env -- \\"]
    lines += [f"  {shlex.quote(f'{k}={v}')} \\" for k, v in env.items()]
    if secret_files:
        folder = shlex.quote(str(secret_files[0].parent))
        stem = shlex.quote(secret_files[0].name.rsplit(".", 1)[0])
        lines.append(f'  GPUQ_SECRETS_FILE={folder}/{stem}."${{SLURM_ARRAY_TASK_ID:-0}}" \\')
    lines.append(f"  {shlex.quote(sys.executable)} -m adapters.runner")
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
    if state in ENDED_BADLY:
        why = f"{state} on Slurm" + (f": {reason}" if reason else "")
        return Status("failed", why, exit_status)
    return Status("running")
