"""Cancel: waiting jobs end CANCELLED at once, running ones are told to stop where they run."""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from app.core import keys
from app.core.errors import InvalidJobSpec, LaunchNotFound
from app.core.identity import Actor
from app.core.states import JobState
from app.ops.nudge import kick_batch
from app.ops.read import check_job_ids, check_launch_id, filters
from app.ops.registry import operation
from app.ops.visibility import check_sees, check_sees_launch, visible
from app.runtime import Runtime
from app.store.jobs import (
    drop_payload_if_finished,
    get_jobs,
    transition,
)
from app.store.models import Job, Launch

log = logging.getLogger(__name__)


def _named_and_over(session: Session, actor: Actor | None, ids: list[int]) -> dict[int, str]:
    """Refuse unknown ids, or another's, before anything changes; return the states of the
    named jobs that have already ended."""
    if not ids:
        return {}
    named = get_jobs(session, ids)
    check_sees(actor, named)
    return {j.id or 0: j.state for j in named if JobState(j.state).terminal}


@operation
def cancel(rt: Runtime, ids: list[int] | None = None, name: str | None = None,
           launch_id: int | None = None, all_jobs: bool = False,
           actor: Actor | None = None) -> dict[str, Any]:
    """Cancel jobs: waiting ones end CANCELLED now, running ones are told to stop. A named
    user who is not an admin cancels only their own: naming another's job or launch is
    refused, and --name and --all reach only their own jobs. Named jobs that had already
    ended come back in `ended` (only then), by id, with their state."""
    if not (ids or name or launch_id is not None or all_jobs):
        raise InvalidJobSpec("say what to cancel: job ids, --name, --launch or --all")
    check_job_ids(ids or [])
    if launch_id is not None:
        check_launch_id(launch_id)
    where = [*filters(None, launch_id, name, ids), *visible(actor)]
    with rt.session() as session:
        over = _named_and_over(session, actor, ids or [])
        if launch_id is not None:
            found = session.get(Launch, launch_id)
            if found is None:
                raise LaunchNotFound(f"no launch with id {launch_id}; `gpuq queue` shows "
                                     "launch ids")
            check_sees_launch(actor, found)
        gpu_queue_job = col(Job.backend) == "local"
        ended = {"ended_at": time.time()}
        cancelled = transition(session, JobState.CANCELLED, "cancelled by user", where, ended,
                               only_from=[JobState.PENDING, JobState.RECOVERING])
        cancelled += transition(session, JobState.CANCELLED, "cancelled by user",
                                [*where, gpu_queue_job], ended, only_from=[JobState.STARTING])
        # Running jobs, and batch jobs already at their backend, are stopped where they run.
        stopping = transition(session, JobState.CANCELLING, "cancel requested", where,
                              only_from=[JobState.RUNNING])
        stopping += transition(session, JobState.CANCELLING, "cancel requested",
                               [*where, ~gpu_queue_job], only_from=[JobState.STARTING])
        already = list(session.scalars(select(Job.id).where(
            *where, col(Job.state) == JobState.CANCELLING.value)))
        # Batch jobs are stopped by their backend's sync: ask for one now, as a submit does.
        backends = set(session.scalars(select(Job.backend).distinct().where(
            *where, ~gpu_queue_job, col(Job.state) == JobState.CANCELLING.value)))
        payloads = session.exec(
            select(func.min(Job.id), col(Job.launch_id), col(Job.payload_key))
            .where(*where, col(Job.payload_key).is_not(None))
            .group_by(col(Job.launch_id), col(Job.payload_key))).all() if cancelled else []
    if already:
        pipe = rt.redis.pipeline(transaction=False)
        for job_id in already:
            pipe.set(keys.cancel(job_id), 1, ex=86400)
        pipe.execute()
    for backend in sorted(backends):
        kick_batch(rt, backend)
    for job_id, lid, key in payloads:
        with rt.session() as session:
            drop_payload_if_finished(session, rt.redis, job_id or 0, lid, key)
    out: dict[str, Any] = {"cancelled": sorted(cancelled), "cancelling": sorted(stopping)}
    if over:  # named jobs that had ended before: nothing to cancel; the caller is told why
        out["ended"] = {str(i): state for i, state in sorted(over.items())}
    return out
