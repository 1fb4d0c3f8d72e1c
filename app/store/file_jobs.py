"""The jobs of a jobs file: which line is which job, per file (the jobs' `origin`).

A line's identity is its job's content hash (command, environment, resources; see
`JobSpec.content_hash`) together with its `name=`: two lines that differ only in their
name are two jobs, and a renamed line is a new job (the old line's job is left as it is).
Its `priority=` is not part of the identity: a new priority on a known line is applied
while the job is PENDING and reported as not applied once it has started or ended.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlmodel import Session, col

from app.core.states import JobState
from app.store.jobs import create_jobs, note, serialize
from app.store.models import Job
from app.store.spec import JobSpec

Identity = tuple[str, str | None]


def identity(spec: JobSpec) -> Identity:
    """What makes a line the same job as another line of the same file."""
    return spec.content_hash(), spec.name


@dataclass(frozen=True)
class LineOutcome:
    """What storing one line did: `status` is submitted, known, reprioritized, not_applied."""

    status: str
    job_id: int
    message: str | None = None


def store_lines(session: Session, origin: str, specs: dict[int, JobSpec]) -> dict[
        int, LineOutcome]:
    """Store the lines of `origin` not stored before; apply a changed priority to a
    PENDING job. `specs` maps a caller's index to a line with an identity of its own."""
    # Two watchers of one file (`gpuq up --jobs-file` and `gpuq watch`) store it in turn.
    serialize(session, hashlib.sha256(origin.encode()).hexdigest())
    latest: dict[Identity, tuple[int, str, int]] = {}
    hashes = sorted({spec.content_hash() for spec in specs.values()})
    for job_id, digest, name, state, priority in session.execute(
            select(col(Job.id), col(Job.content_hash), col(Job.name), col(Job.state),
                   col(Job.priority))
            .where(col(Job.origin) == origin, col(Job.content_hash).in_(hashes))
            .order_by(col(Job.id))):
        latest[(digest, name)] = (job_id, state, priority)
    outcomes: dict[int, LineOutcome] = {}
    for index, spec in specs.items():
        found = latest.get(identity(spec))
        if found is None:
            outcomes[index] = LineOutcome("submitted", create_jobs(session, spec, 1,
                                                                   launch=False)[1][0])
        else:
            outcomes[index] = _reprioritize(session, spec.priority, *found)
    return outcomes


def _reprioritize(session: Session, priority: int, job_id: int, state: str,
                  was: int) -> LineOutcome:
    if priority == was:
        return LineOutcome("known", job_id)
    moved = session.execute(update(Job).where(
        col(Job.id) == job_id, col(Job.state) == JobState.PENDING.value
    ).values(priority=priority).returning(col(Job.id))).first()
    if moved is not None:
        note(session, job_id, f"priority {was} -> {priority} (edited in the jobs file)")
        return LineOutcome("reprioritized", job_id, f"job {job_id}: priority {was} -> "
                           f"{priority}")
    now = session.get(Job, job_id)
    return LineOutcome("not_applied", job_id, (
        f"job {job_id} is already {now.state if now else state}: the new priority {priority} "
        f"is not applied (a priority edit applies only while the job is PENDING)"))
