"""The one place a job's environment is built, for every backend.

A job inherits nothing of the process that starts it but a short allow-list (where
programs are, who runs them, the locale, the terminal): never gpuq's own settings
(GPUQ_SECRET, the database's and the broker's URLs with their passwords), nor anything
else the worker happens to hold. On top come the job's own variables, gpuq's per-job
variables (id, rank, world size, GPUs: what app/client/environment.py reads), and last
its secrets.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Variables a job inherits from the process that starts it, when that process has them.
INHERITED = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TERM", "TZ",
             "TMPDIR", "PYTHONPATH", "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_VISIBLE_DEVICES",
             "CONDA_EXE")
INHERITED_PREFIXES = ("LC_",)  # the locale's categories
# gpuq's variables a job may see: what it is (app/client/environment.py) and, for a batch
# runner, where its payload and result are. Any other GPUQ_* name never reaches a job.
JOB_VARIABLES = ("GPUQ_JOB_ID", "GPUQ_LAUNCH_ID", "GPUQ_JOB_RANK", "GPUQ_NUM_JOBS",
                 "GPUQ_RESTART_COUNT", "GPUQ_ATTEMPT", "GPUQ_HOST", "GPUQ_JOB_DEADLINE")


def inherited(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The part of `environ` (default: this process's) that a job may inherit."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items()
            if k in INHERITED or k.startswith(INHERITED_PREFIXES)}


def job_environment(own: Mapping[str, str], gpuq: Mapping[str, str],
                    secrets: Mapping[str, str] | None = None,
                    environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A job's whole environment: the allow-listed part of `environ`, the job's `own`
    variables, gpuq's per-job variables `gpuq`, then its `secrets`."""
    env = inherited(environ)
    env.update(own)
    env.update(gpuq)
    env.update(secrets or {})
    return env
