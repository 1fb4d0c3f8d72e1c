"""A worker that starts again after dying takes stock of the jobs it was running.

A job's process group lives in its own session, so it may have outlived the worker. The new
worker (a GPU's, for the jobs led on its GPU; the CPU worker, for 0-GPU jobs) stops that
group, but only if its leader is still the process the job started (a pid reused since, or
after a reboot, is left alone), empties the job's container (scheduler/worker/containment.py:
what left the group, daemons included), releases the job's GPUs, and settles the job as
reconciliation does (scheduler/dispatch/reconcile.py `settle`): by the restart policy,
RECOVERING then PENDING while restarts remain, LOST when none do.
"""

from __future__ import annotations

import logging

from sqlmodel import col, select

from app.core.procgroup import kill_group_if
from app.core.states import JobState
from app.runtime import Runtime
from app.store.cluster import holder, release
from app.store.models import Job
from scheduler.dispatch.reconcile import settle
from scheduler.worker import containment

log = logging.getLogger(__name__)


def _lead_gpu(job: Job) -> int | None:
    return job.gpu_ids[0] if job.gpu_ids else None


def recover_orphans(rt: Runtime, gpu_index: int | None) -> list[int]:
    """Settle the jobs this host's worker of `gpu_index` (None: its CPU worker) left behind;
    return their ids."""
    host = rt.settings.hostname
    live = [JobState.RUNNING.value, JobState.CANCELLING.value]
    with rt.session() as session:
        jobs = [j for j in session.exec(select(Job).where(
            col(Job.host) == host, col(Job.state).in_(live), col(Job.backend) == "local"))
            if _lead_gpu(j) == gpu_index]
    containment.sweep(host)  # empty cgroups of attempts settled while their worker was away
    settled = []
    for job in jobs:
        assert job.id is not None
        if job.pid:
            kill_group_if(job.pid, job.pid_identity)
        left = containment.left_by(job.id, job.attempt, host)  # what escaped its group
        left.kill_all()
        left.close()
        settle(rt, job)
        release(rt.redis, host, job.gpu_ids or [], holder(job.id, job.attempt))
        settled.append(job.id)
    if settled:
        log.warning("%s of %s: settled jobs %s left by a worker that died",
                    "the CPU" if gpu_index is None else f"GPU {gpu_index}",
                    host, settled)
    return settled
