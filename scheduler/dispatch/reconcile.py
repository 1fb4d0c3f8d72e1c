"""Reconciliation: the database is the truth and messages are hints; repair what a lost
message or a dead worker left behind. Idempotent, so several hosts may run it at once.

Every attempt of a local job holds a lease in its row (`lease_until`): the dispatcher gives
it one when it routes the job, the worker that runs it renews it (scheduler/worker/lease.py)
and stops the job itself when it cannot, before the lease runs out. So an attempt whose
lease ran out by `lease_margin_s` is dead for sure, whatever Redis says, and only then:

- STARTING: its start message was lost, or its worker died before it started the job: back
  to PENDING, routed again; a late copy of the old message is refused by its attempt number.
  0-GPU jobs are routed only into free CPU slots, so their messages wait for no slot, and
  the same rule holds for them without reading the CPU queue.
- RUNNING or CANCELLING, GPU or 0-GPU: its worker died, or was cut off and stopped the job:
  the restart policy settles it (RECOVERING then PENDING while restarts remain, else LOST; a
  CANCELLING job ends CANCELLED).

Besides, a job waiting on others that have all ended (a submission raced their ending) is
released, or cancelled when one of them did not succeed: looking only at the dependents of
the jobs that ended since the last tick, so that a tick costs the same however many jobs
wait.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence

from sqlalchemy import ColumnElement, func
from sqlmodel import Session, col, select

from app.core import keys
from app.core.states import JobState
from app.runtime import Runtime
from app.store import cluster, dependencies, restart_policy
from app.store.jobs import HOLDING, attempt_is, cancel_waiting, transition
from app.store.models import Job

log = logging.getLogger(__name__)


def lease_ran_out(rt: Runtime, now: float) -> ColumnElement[bool]:
    """The attempt's lease ran out more than the margin ago (a row from before leases
    counts from when it was dispatched)."""
    lease = func.coalesce(col(Job.lease_until),
                          col(Job.dispatched_at) + rt.settings.reservation_ttl_s, 0.0)
    return lease < now - rt.settings.lease_margin_s


def reconcile(rt: Runtime) -> dict[str, list[int]]:
    """One repair pass; returns the ids it requeued and the ids it settled."""
    now = time.time()
    ran_out = lease_ran_out(rt, now)
    with rt.session() as session:
        jobs = list(session.exec(select(Job).where(
            col(Job.backend) == "local", col(Job.state).in_([s.value for s in HOLDING]),
            ran_out)))
    requeued, settled = [], []
    for job in jobs:
        assert job.id is not None
        if job.state == JobState.STARTING.value:
            with rt.session() as session:
                if transition(session, JobState.PENDING, "its start message was lost; queued "
                              "again", [*attempt_is(job.id, job.attempt), ran_out],
                              {"lease_until": None}, only_from=[JobState.STARTING]):
                    requeued.append(job.id)
        elif settle(rt, job, [ran_out]):
            settled.append(job.id)
        if job.gpu_ids and job.host:  # the dead attempt's reservations, if Redis kept them
            cluster.release(rt.redis, job.host, job.gpu_ids, cluster.holder(job.id, job.attempt))
    released = _settle_stranded_dependents(rt)
    if requeued or settled or released:
        log.warning("reconcile: requeued %s, settled %s", requeued, settled)
        from scheduler.dispatch.allocator import Dispatcher

        Dispatcher(rt).dispatch()
    return {"requeued": requeued, "settled": settled}


def settle(rt: Runtime, job: Job, where: Sequence[ColumnElement[bool]] = ()) -> bool:
    """Record the end of an attempt whose worker is gone: the outcome its worker kept in
    Redis when the database could not take it, else a lost attempt (restart it or call it
    LOST); False when the job had moved on and nothing was written.

    Reconciliation calls this for attempts whose lease ran out (`where` pins that), and a
    restarted worker for its own orphans (scheduler/worker/recovery.py)."""
    assert job.id is not None
    kept = None
    with contextlib.suppress(Exception):  # Redis away: nothing was kept that can be read
        kept = cluster.kept_outcome(rt.redis, job.id, job.attempt)
    if kept is not None:
        end = restart_policy.AttemptEnd(**kept["end"])
        ended_at, exit_code = kept["ended_at"], kept["exit_code"]
    else:
        end = restart_policy.AttemptEnd(lost=True, why="its worker died")
        ended_at, exit_code = time.time(), None
    with rt.session() as session:
        return record_end(session, job, end, ended_at, exit_code, where) is not None


def record_end(session: Session, job: Job, end: restart_policy.AttemptEnd, ended_at: float,
               exit_code: int | None, where: Sequence[ColumnElement[bool]] = ()) -> str | None:
    """Apply the restart policy to how `job`'s current attempt ended, in one UPDATE from
    the state it was read in and fenced on its attempt: a second reconciler, or a worker
    recording the same end, finds the job moved on. A cancel that reached the job wins over
    how its process ended. The job's new state, or None when nothing was written."""
    if job.state == JobState.CANCELLING.value and not end.cancelled:
        why = "cancelled; its worker died" if end.lost else None
        end = restart_policy.AttemptEnd(exit_code=end.exit_code, cancelled=True, why=why)
    moved = restart_policy.apply(session, job, end,
                                 restart_policy.ended_values(job, ended_at, exit_code),
                                 only_from=[JobState(job.state)], where=where)
    return None if moved is None else moved.value


# How far before the last tick the next one looks for endings: an ending is dated by its
# writer's clock before it commits, on another host perhaps.
ENDINGS_MARGIN_S = 300.0


def _settle_stranded_dependents(rt: Runtime) -> int:
    """Release or cancel waiting jobs whose dependencies all ended unseen; return how many.
    A tick looks only at the dependents of jobs that ended since the last one (the first
    tick, and the first after Redis lost the mark, at every waiting job)."""
    now = time.time()
    mark = rt.redis.get(keys.RECONCILED_ENDINGS)
    since = float(mark) - ENDINGS_MARGIN_S if mark is not None else None
    with rt.session() as session:
        ready, doomed = dependencies.stranded(session, since)
        dependencies.release_ready(session, ready)
        cancel_waiting(session, doomed, "a job it runs after did not succeed")
    rt.redis.set(keys.RECONCILED_ENDINGS, now)
    return len(ready) + len(doomed)


def prune_finished_jobs(rt: Runtime, days: float | None = None) -> int:
    """Delete the jobs that ended more than `days` (GPUQ_KEEP_FINISHED_DAYS; 0 there keeps
    them for ever) ago, app/store/retention.py; how many. Their files on this host go at
    once, those on other hosts with each host's next sweep."""
    from app.store.retention import prune_finished

    if days is None:
        days = rt.settings.keep_finished_days
        if days <= 0:
            return 0
    pruned = prune_finished(rt.engine, rt.redis, time.time() - days * 86400,
                            settings=rt.settings)
    if pruned.jobs:
        log.info("prune: %d finished jobs, %d events, %d launches, %d payloads, %d files "
                 "here", pruned.jobs, pruned.events, pruned.launches, pruned.payloads,
                 pruned.files)
    return pruned.jobs
