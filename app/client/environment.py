"""What a running job knows about itself: its id, launch, rank, world size, GPUs and the
time by which it must end.

    from app.client import JobEnvironment

    env = JobEnvironment.current()
    shard = dataset[env.rank::env.num_jobs]

Code inside a job imports this, so it imports only the standard library: reading a rank
must not cost a Celery import. The variables are those app/core/job_env.py lets through
(JOB_VARIABLES): a job sees no other GPUQ_* variable.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class JobEnvironment:
    """The GPUQ_* variables gpuq gives every replica, typed; defaults outside gpuq."""

    job_id: int | None = None  # GPUQ_JOB_ID; None outside gpuq
    launch_id: int | None = None  # GPUQ_LAUNCH_ID; None for a job not part of a launch
    rank: int = 0  # GPUQ_JOB_RANK: 0..num_jobs-1 within the launch
    num_jobs: int = 1  # GPUQ_NUM_JOBS: replicas in the launch
    restart_count: int = 0  # GPUQ_RESTART_COUNT: restarts before this attempt
    attempt: int | None = None  # GPUQ_ATTEMPT: this run's attempt number (1, 2, ...)
    host: str | None = None  # GPUQ_HOST: the host running the job (local GPUs only)
    gpus: list[int] = field(default_factory=list)  # CUDA_VISIBLE_DEVICES, as indices
    # GPUQ_JOB_DEADLINE: when this attempt reaches its time limit (--time), in UTC epoch
    # seconds, as it started; None without a limit. The worker stops the job then (a
    # `gpuq update --time` made later moves the real limit, not this).
    deadline: float | None = None

    def remaining_s(self, now: float | None = None) -> float | None:
        """Seconds left before the time limit (0 once past it); None without a limit."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - (time.time() if now is None else now))

    @property
    def in_gpuq(self) -> bool:
        """Whether this process runs as a gpuq job."""
        return self.job_id is not None

    @classmethod
    def current(cls) -> JobEnvironment:
        """This process's job environment."""
        return cls.from_env(os.environ)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> JobEnvironment:
        """The job environment that `environ` (default: os.environ) describes."""
        env = os.environ if environ is None else environ
        return cls(
            job_id=_optional_int(env, "GPUQ_JOB_ID"),
            launch_id=_optional_int(env, "GPUQ_LAUNCH_ID"),
            rank=_optional_int(env, "GPUQ_JOB_RANK") or 0,
            num_jobs=_optional_int(env, "GPUQ_NUM_JOBS") or 1,
            restart_count=_optional_int(env, "GPUQ_RESTART_COUNT") or 0,
            attempt=_optional_int(env, "GPUQ_ATTEMPT"),
            host=env.get("GPUQ_HOST") or None,
            gpus=_gpu_indices(env.get("CUDA_VISIBLE_DEVICES", "")),
            deadline=_optional_int(env, "GPUQ_JOB_DEADLINE"),
        )


def _optional_int(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer") from None


def _gpu_indices(text: str) -> list[int]:
    """The GPU indices of CUDA_VISIBLE_DEVICES. gpuq always writes indices; a value set
    outside gpuq may name GPUs by UUID, which have no index here and are left out."""
    return [int(part) for part in (p.strip() for p in text.split(",")) if part.isdigit()]
