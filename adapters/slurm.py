"""Slurm: sbatch (a launch is an array job), scontrol for state, scancel.

Works without Slurm accounting: states come from `scontrol show job`, which knows a job
until MinJobAge after it ends; where the cluster runs slurmdbd (`scontrol show config`
says so), jobs scontrol has forgotten are looked up with `sacct`. Payloads over the inline
limit, results and output files live in GPUQ_SLURM_SHARED_DIR, which every node must see.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from adapters.base import BatchAdapter, Status, Submission, SubmitRefused
from app.core.errors import GpuqError
from app.core.paths import BatchStore
from app.core.settings import Settings
from app.store.models import Job

WAITING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
           "RESV_DEL_HOLD"}
ENDED_WELL = {"COMPLETED"}
CANCELLED = {"CANCELLED"}
# Everything else that has ended (FAILED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, PREEMPTED,
# BOOT_FAIL, DEADLINE) is a failure; a state not named here is a running one.
ENDED_BADLY = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
               "DEADLINE"}


class SlurmAdapter(BatchAdapter):
    backend_name = "slurm"
    name = "gpuq.batch.slurm"

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
                                  timeout=self.call_timeout_s, check=False)
        except FileNotFoundError:
            raise SubmitRefused(f"{args[0]} is not installed here: run the control worker on "
                                "a Slurm login node (deploy/slurm/setup.sh makes a one-node "
                                "cluster for development)") from None
        except subprocess.TimeoutExpired:
            raise GpuqError(f"{args[0]} did not answer in {self.call_timeout_s:.0f}s") from None
        if done.returncode != 0:
            message = f"{' '.join(args[:2])} failed: {done.stderr.strip()}"
            # sbatch's own time-outs talking to the controller leave its fate unknown.
            if args[0] == "sbatch" and "timed out" not in done.stderr.lower():
                raise SubmitRefused(message)
            raise GpuqError(message)
        return done.stdout

    @cached_property
    def config(self) -> dict[str, str]:
        lines = self._run("scontrol", "show", "config").splitlines()
        return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in lines) if v}

    def array_limit(self) -> int:
        return int(self.config.get("MaxArraySize", "1001"))  # indices stay below it

    def submit(self, submission: Submission) -> str:
        """One sbatch: an array when the part has several replicas. The job name is the
        submission's tag; the user's name goes in the comment."""
        settings = self.rt.settings
        out_dir = BatchStore(self.store_dir(settings)).backend_dir("slurm")
        out_dir.mkdir(parents=True, exist_ok=True)
        comment = re.sub(r"[\s=]+", "_", submission.name)[:128]
        command = ["sbatch", "--parsable", f"--job-name={submission.tag}",
                   f"--comment={comment}"]
        for option, value in (("partition", settings.slurm_partition),
                              ("account", settings.slurm_account),
                              ("time", settings.slurm_time_limit),
                              ("chdir", submission.workdir)):
            if value:
                command.append(f"--{option}={value}")
        if submission.gpus:
            command.append(f"--gpus={submission.gpus}" if settings.slurm_gpu_option == "gpus"
                           else f"--gres=gpu:{submission.gpus}")
        script = f"#!/bin/sh\nexec {sys.executable} -m adapters.runner\n"
        part = submission.jobs
        env = {**os.environ, **submission.env, "GPUQ_RANK_OFFSET": str(part[0].rank)}
        if len(part) == 1:
            env.update(GPUQ_JOB_RANK=str(part[0].rank), GPUQ_JOB_ID=str(part[0].id))
            array = [f"--output={out_dir}/%j.out"]
        else:
            array = [f"--array=0-{len(part) - 1}", f"--output={out_dir}/%A_%a.out"]
        return self._run(*command, *array, env=env, stdin=script).strip().split(";")[0]

    def member_ids(self, handle: str, count: int) -> list[str]:
        return [handle] if count == 1 else [f"{handle}_{index}" for index in range(count)]

    def tagged(self) -> dict[str, str]:
        """Jobs the controller knows by their name (a tag); an array's handle is its id."""
        found = {}
        for record in _records(self._run("scontrol", "show", "job", "--oneliner")):
            name = record.get("JobName", "")
            if name.startswith("gpuq-"):
                found[name] = record.get("ArrayJobId") or record["JobId"]
        return found

    def poll(self, backend_ids: Sequence[str]) -> dict[str, Status]:
        """One `scontrol show job` for every job the controller still knows; `sacct` for
        the rest when accounting is there."""
        statuses: dict[str, Status] = {}
        for record in _records(self._run("scontrol", "show", "job", "--oneliner")):
            for backend_id in _ids(record):
                statuses[backend_id] = _status(record["JobState"], record.get("Reason"),
                                               record.get("ExitCode"))
        forgotten = [i for i in backend_ids if i not in statuses]
        if forgotten and self.config.get("AccountingStorageType", "").endswith("slurmdbd"):
            for line in self._run("sacct", "--noheader", "--parsable2", "-X",
                                  "--format=JobID,State,ExitCode,Reason",
                                  f"--jobs={','.join(forgotten)}").splitlines():
                job_id, state, exit_code, reason = line.split("|")
                statuses[job_id] = _status(state.split()[0], reason, exit_code)
        return {i: statuses[i] for i in backend_ids if i in statuses}

    def cancel(self, backend_ids: Sequence[str]) -> None:
        self._run("scancel", *backend_ids)


def _records(text: str) -> list[dict[str, str]]:
    """`scontrol --oneliner` lines as key=value dicts (values hold no spaces but Command)."""
    records = []
    for line in text.splitlines():
        if line.startswith("JobId="):
            records.append(dict(re.findall(r"(\w+)=(\S*)", line)))
    return records


def _ids(record: dict[str, str]) -> list[str]:
    """The backend ids one record stands for: `A_i` for array tasks (a pending record may
    stand for a range, `1-4,7` or `0-9:2`), the job id otherwise."""
    parent, tasks = record.get("ArrayJobId"), record.get("ArrayTaskId")
    if not parent or not tasks:
        return [record["JobId"]]
    ids = []
    for chunk in tasks.split("%")[0].split(","):
        first, _, rest = chunk.partition("-")
        last, _, step = rest.partition(":")
        ids += [f"{parent}_{i}" for i in range(int(first), int(last or first) + 1,
                                               int(step or 1))]
    return ids


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
