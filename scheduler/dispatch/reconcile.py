"""Reconciliation: the database is the truth and messages are hints; repair what a lost
message or a dead worker left behind. Idempotent, so several hosts may run it at once.

- A GPU job STARTING whose reservation has expired never reached its worker (the message
  was lost after the broker handed it out, or the worker died before taking it): it goes
  back to PENDING and is routed again; a late copy of the old message is refused by its
  attempt number.
- A 0-GPU job STARTING for longer than the reservation TTL whose message is not on the
  CPU queue: the same.
- A job waiting on others that have all ended (a submission raced their ending): it is
  released, or cancelled when one of them did not succeed.
- A job RUNNING whose reservation has expired and whose GPU worker is not alive: its
  worker died with its host (a restarted worker settles its own orphans itself), so it
  goes RECOVERING then PENDING while restarts remain, else LOST.
"""

from __future__ import annotations

import json
import logging
import time

from sqlmodel import col, select

from app.core.keys import CPU_QUEUE
from app.core.states import JobState
from app.runtime import Runtime
from app.store import cluster, dependencies, restart_policy
from app.store.jobs import cancel_waiting, transition
from app.store.models import Job

log = logging.getLogger(__name__)


def _held(rt: Runtime, job: Job) -> bool:
    assert job.id is not None
    return cluster.holds_any(rt.redis, job.host or "", job.gpu_ids or [],
                             cluster.holder(job.id, job.attempt))


def _queued_cpu_attempts(rt: Runtime) -> set[tuple[int, int]]:
    import base64

    found = set()
    for raw in rt.redis.lrange(CPU_QUEUE, 0, -1):  # type: ignore[union-attr]
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        found.add((int(body[0][0]), int(body[0][1])))
    return found


def reconcile(rt: Runtime) -> dict[str, list[int]]:
    """One repair pass; returns the ids it requeued and the ids it settled."""
    now = time.time()
    ttl = rt.settings.reservation_ttl_s
    with rt.session() as session:
        jobs = list(session.exec(select(Job).where(
            col(Job.backend) == "local",
            col(Job.state).in_([JobState.STARTING.value, JobState.RUNNING.value]))))
    queued: set[tuple[int, int]] | None = None
    requeued, settled = [], []
    for job in jobs:
        assert job.id is not None
        if job.state == JobState.STARTING.value:
            if job.gpu_ids and _held(rt, job):
                continue
            if not job.gpu_ids:
                if now - (job.dispatched_at or now) < ttl:
                    continue
                queued = _queued_cpu_attempts(rt) if queued is None else queued
                if (job.id, job.attempt) in queued:
                    continue
            with rt.session() as session:
                if transition(session, JobState.PENDING, "its start message was lost; queued "
                              "again", [col(Job.id) == job.id], only_from=[JobState.STARTING]):
                    requeued.append(job.id)
        elif job.gpu_ids and not _held(rt, job) and not cluster.is_alive(
                rt.redis, job.host or "", job.gpu_ids[0]):
            settle(rt, job)
            settled.append(job.id)
    released = _settle_stranded_dependents(rt)
    if requeued or settled or released:
        log.warning("reconcile: requeued %s, settled %s", requeued, settled)
        from scheduler.dispatch.allocator import Dispatcher

        Dispatcher(rt).dispatch()
    return {"requeued": requeued, "settled": settled}


def settle(rt: Runtime, job: Job) -> None:
    """Apply the restart policy to a job whose worker died: restart it or call it LOST.

    Reconciliation calls this for a dead host's jobs, and a restarted GPU worker for its
    own orphans (scheduler/worker/recovery.py)."""
    now = time.time()
    ended = {"ended_at": now, "runtime_s": job.runtime_s + now - (job.started_at or now),
             "pid": None}
    cancelling = job.state == JobState.CANCELLING.value
    end = restart_policy.AttemptEnd(
        lost=not cancelling, cancelled=cancelling,
        why="cancelled; its worker died" if cancelling else "its worker died")
    # The attempt pins the move to what the caller saw: a second reconciler, or a worker
    # settling its orphans at the same moment, finds the job moved on and changes nothing.
    with rt.session() as session:
        restart_policy.apply(session, job, end, ended,
                             only_from=[JobState.CANCELLING if cancelling else JobState.RUNNING])


def _settle_stranded_dependents(rt: Runtime) -> int:
    """Release or cancel waiting jobs whose dependencies all ended unseen; return how many."""
    with rt.session() as session:
        ready, doomed = dependencies.stranded(session)
        dependencies.release_ready(session, ready)
        cancel_waiting(session, doomed, "a job it runs after did not succeed")
    return len(ready) + len(doomed)
