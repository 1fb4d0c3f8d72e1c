"""Job dependencies: a job submitted `after` others stays PENDING, and is passed over by
the dispatcher (`waiting`), until every one of them has SUCCEEDED; if one ends any other
way, the jobs after it are cancelled, since they could never start.

The edges live in `job_dependencies`. The moment a job ends is the moment its dependents
are settled, in the same transaction, by the one transition function; reconciliation
repairs any that a race between a submission and an ending left waiting.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from sqlalchemy import Select, insert, true, update
from sqlmodel import Session, col, select

from app.core.errors import InvalidJobSpec, JobNotFound, NotPermitted
from app.core.identity import Actor, sees
from app.core.states import JobState
from app.store.models import Job, JobDependency, fixed

# Bound the ids bound into one statement (SQLite allows 32,766 variables).
CHUNK = 10_000
T = TypeVar("T")


def chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), CHUNK):
        yield items[start:start + CHUNK]


def must_wait(session: Session, after: Sequence[int], viewer: Actor | None = None) -> bool:
    """Check the jobs a new job of `viewer`'s runs after; True while some have not
    SUCCEEDED yet. A job the viewer may not see is refused as reading it is, before its
    state is looked at, so that the refusal tells nothing of it.

    Their rows are locked (PostgreSQL) so that none of them can end between this check
    and the new job's edges being stored."""
    rows = session.execute(select(col(Job.id), col(Job.state), col(Job.owner))
                           .where(col(Job.id).in_(after)).with_for_update()).all()
    missing = sorted(set(after) - {row.id for row in rows})
    if missing:
        raise JobNotFound(f"--after names no such job: {', '.join(map(str, missing))}; "
                          "`gpuq queue` lists job ids")
    hidden = [row.id for row in rows if not sees(viewer, row.owner)]
    if hidden:
        assert viewer is not None
        raise NotPermitted.for_jobs(viewer.name, hidden)
    found = {row.id: row.state for row in rows}
    for job_id, state in sorted(found.items()):
        if JobState(state).terminal and state != JobState.SUCCEEDED.value:
            raise InvalidJobSpec(f"job {job_id} ended {state}, so a job after it could never "
                                 f"start; drop {job_id} from --after")
    return any(state != JobState.SUCCEEDED.value for state in found.values())


def record(session: Session, job_ids: Sequence[int], after: Sequence[int]) -> None:
    """Store the edges of new jobs (one row per job and job it runs after)."""
    edges: list[dict[str, Any]] = [{"job_id": job_id, "after_id": a}
                                   for job_id in job_ids for a in after]
    for chunk in chunks(edges):
        session.execute(insert(JobDependency), list(chunk))


def _dependents(session: Session, ended: Sequence[int]) -> set[int]:
    found: set[int] = set()
    for chunk in chunks(ended):
        found.update(session.scalars(select(col(JobDependency.job_id)).where(
            col(JobDependency.after_id).in_(chunk))))
    return found


def release_ready(session: Session, candidates: Sequence[int]) -> None:
    """Let the dispatcher see those of `candidates` whose every dependency SUCCEEDED."""
    unmet = (select(col(JobDependency.job_id)).join(Job, col(Job.id) == JobDependency.after_id)
             .where(col(Job.state) != JobState.SUCCEEDED.value))
    for chunk in chunks(candidates):
        session.execute(update(Job).where(
            col(Job.id).in_(chunk), col(Job.waiting), col(Job.id).not_in(unmet)
        ).values(waiting=False, reason=None))


def settle_dependents(session: Session, ended: Sequence[int], state: JobState) -> list[int]:
    """Jobs `ended` have reached terminal `state`: release the dependents that are ready
    and return the waiting dependents that can now never start (to be cancelled)."""
    dependents = sorted(_dependents(session, ended))
    if not dependents:
        return []
    if state is JobState.SUCCEEDED:
        release_ready(session, dependents)
        return []
    doomed: list[int] = []
    for chunk in chunks(dependents):
        doomed.extend(session.scalars(select(col(Job.id)).where(
            col(Job.id).in_(chunk), col(Job.waiting),
            col(Job.state) == JobState.PENDING.value)))
    return doomed


def waiting_query() -> Select[int | None]:
    """The PENDING jobs waiting for others, written as their partial index has it
    (app/store/models.py): a planner matches such an index only against values it sees."""
    return select(col(Job.id)).where(
        col(Job.state) == fixed(JobState.PENDING.value),
        col(Job.waiting) == true())


def stranded(session: Session, ended_since: float | None = None
             ) -> tuple[list[int], list[int]]:
    """Waiting jobs whose dependencies all ended while nobody settled them: (ready ids,
    doomed ids). Only a submission racing an ending leaves such a job. With `ended_since`,
    only the dependents of jobs that ended since then are looked at (through the index of
    ended_at and that of after_id), so the cost is that of the recent endings, not of
    every waiting job; without it, every waiting job."""
    if ended_since is None:
        scopes: list[Any] = [waiting_query()]
    else:
        recent = [i for i in session.scalars(select(col(Job.id)).where(
            col(Job.ended_at) >= ended_since)) if i is not None]
        dependents = sorted(_dependents(session, recent))
        scopes = [waiting_query().where(col(Job.id).in_(chunk))
                  for chunk in chunks(dependents)]
    states: dict[int, set[str]] = {}
    for scope in scopes:
        for job_id, state in session.execute(
                select(col(JobDependency.job_id), col(Job.state))
                .join(Job, col(Job.id) == JobDependency.after_id)
                .where(col(JobDependency.job_id).in_(scope))):
            states.setdefault(job_id, set()).add(state)
    ready = [j for j, s in states.items() if s == {JobState.SUCCEEDED.value}]
    doomed = [j for j, s in states.items() if any(
        JobState(x).terminal and x != JobState.SUCCEEDED.value for x in s)]
    return sorted(ready), sorted(doomed)
