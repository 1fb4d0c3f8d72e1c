"""JobEnvironment: what a job reads about itself, typed, with defaults outside gpuq."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from app.client import JobEnvironment
from app.store.models import Job
from scheduler.worker.executor import job_environment


def test_a_replica_reads_what_the_worker_sets():
    job = Job(id=42, launch_id=7, rank=3, num_jobs=8, restart_count=1, attempt=2,
              command="true")
    env = job_environment(job, {"PATH": "/usr/bin"}, gpu_ids=[2, 5], host="box")

    seen = JobEnvironment.from_env(env)

    assert env["GPUQ_ATTEMPT"] == "2"
    assert seen == JobEnvironment(job_id=42, launch_id=7, rank=3, num_jobs=8,
                                  restart_count=1, attempt=2, host="box", gpus=[2, 5])
    assert seen.in_gpuq


def test_a_job_outside_a_launch_has_no_launch_id_and_rank_zero_of_one():
    job = Job(id=5, launch_id=None, rank=0, num_jobs=1, command="true")
    seen = JobEnvironment.from_env(job_environment(job, {}, gpu_ids=[], host="box"))
    assert (seen.launch_id, seen.rank, seen.num_jobs, seen.gpus) == (None, 0, 1, [])


def test_outside_gpuq_every_field_has_its_default():
    seen = JobEnvironment.from_env({"PATH": "/usr/bin"})
    assert seen == JobEnvironment()
    assert not seen.in_gpuq
    assert (seen.job_id, seen.rank, seen.num_jobs, seen.restart_count, seen.gpus) == (
        None, 0, 1, 0, [])


def test_current_reads_this_process(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GPUQ_JOB_ID", "9")
    monkeypatch.setenv("GPUQ_JOB_RANK", "2")
    monkeypatch.setenv("GPUQ_NUM_JOBS", "4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    seen = JobEnvironment.current()
    assert (seen.job_id, seen.rank, seen.num_jobs, seen.gpus) == (9, 2, 4, [1])


def test_gpus_named_by_uuid_outside_gpuq_are_left_out():
    seen = JobEnvironment.from_env({"CUDA_VISIBLE_DEVICES": "GPU-8a2c,3"})
    assert seen.gpus == [3]


def test_a_malformed_variable_is_named():
    with pytest.raises(ValueError, match="GPUQ_JOB_RANK='two'"):
        JobEnvironment.from_env({"GPUQ_JOB_RANK": "two"})


def test_it_cannot_be_changed():
    with pytest.raises(dataclasses.FrozenInstanceError):
        JobEnvironment().rank = 1  # type: ignore[misc]


def test_importing_it_loads_only_the_standard_library(tmp_path):
    code = ("import sys; from app.client import JobEnvironment; JobEnvironment.current(); "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True, cwd=tmp_path).stdout.split())
    assert loaded.isdisjoint({"celery", "kombu", "redis", "sqlalchemy", "sqlmodel",
                              "pydantic", "cloudpickle"})
