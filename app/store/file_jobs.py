"""The lines of a jobs file and the jobs they made, per file (its `origin`): each line is
submitted once for as long as it stays in the file.

A line's identity (its `line_key`) is its job's content hash (command, environment,
resources; see `JobSpec.content_hash`) together with its `name=`: two lines that differ
only in their name are two jobs, and a renamed line is a new job (the old line's job is
left as it is). Its `priority=` is not part of the identity: a new priority on a known line
is applied while the job is PENDING and reported as not applied once it has started or
ended.

The identities live in `jobs_file_lines`, apart from the jobs: retention prunes a line's
job and the line is still known, so a month-old line is never run again. A line is
forgotten only when it leaves the file (its watcher says which lines the file holds), so
that a line removed and put back is submitted again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import delete, insert, select, update
from sqlmodel import Session, col

from app.core.errors import InvalidArguments
from app.core.states import JobState
from app.core.text import MAX_PATH_CHARS
from app.store.jobs import create_jobs, note, serialize
from app.store.models import FileLine, Job
from app.store.spec import JobSpec

Identity = str
CHUNK = 1000  # keys per statement: every database takes this many parameters


def line_key(spec: JobSpec) -> Identity:
    """What makes a line the same job as another line of the same file."""
    return hashlib.sha256(json.dumps([spec.content_hash(), spec.name]).encode()).hexdigest()[:32]


def check_origin(origin: str) -> None:
    """An origin is a file's path, as its watcher resolved it."""
    if not origin or len(origin) > MAX_PATH_CHARS or "\0" in origin:
        raise InvalidArguments(f"origin is the jobs file's path: not empty, no NUL, at most "
                               f"{MAX_PATH_CHARS:,} characters")
    try:
        origin.encode()
    except UnicodeEncodeError:
        raise InvalidArguments("origin holds bytes that are not UTF-8; name the file by a "
                               "UTF-8 path") from None


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
    _serialize(session, origin)
    keys = {index: line_key(spec) for index, spec in specs.items()}
    known: dict[Identity, tuple[int, str | None, int | None]] = {
        key: (job_id, state, priority) for key, job_id, state, priority in session.execute(
            select(col(FileLine.line_key), col(FileLine.job_id), col(Job.state),
                   col(Job.priority))
            .outerjoin(Job, col(Job.id) == col(FileLine.job_id))
            .where(col(FileLine.origin) == origin,
                   col(FileLine.line_key).in_(sorted(set(keys.values())))))}
    outcomes: dict[int, LineOutcome] = {}
    new: list[dict[str, object]] = []
    now = time.time()
    for index, spec in specs.items():
        found = known.get(keys[index])
        if found is None:
            job_id = create_jobs(session, spec, 1, launch=False)[1][0]
            new.append({"origin": origin, "line_key": keys[index], "job_id": job_id,
                        "stored_at": now})
            outcomes[index] = LineOutcome("submitted", job_id)
        elif found[1] is None:  # its job was pruned: the line is known all the same
            outcomes[index] = LineOutcome("known", found[0])
        else:
            job_id, state, was = found
            outcomes[index] = _reprioritize(session, spec.priority, job_id, state,
                                            was if was is not None else spec.priority)
    if new:
        conn = session.connection()
        conn.execute(insert(FileLine), new)
        conn.execute(update(Job).where(col(Job.id).in_([row["job_id"] for row in new]))
                     .values(origin=origin))
    return outcomes


def absent_lines(session: Session, origin: str, present: Collection[Identity],
                 forget: bool) -> int:
    """The lines of `origin` stored before that are not among `present` (the file's whole
    set of lines now): how many; deleted when `forget`, so that such a line put back in
    the file is submitted again."""
    if forget:
        _serialize(session, origin)
    stored = session.execute(select(col(FileLine.line_key))
                             .where(col(FileLine.origin) == origin)).scalars()
    absent = sorted(set(stored) - set(present))
    if forget:
        for start in range(0, len(absent), CHUNK):
            session.execute(delete(FileLine).where(
                col(FileLine.origin) == origin,
                col(FileLine.line_key).in_(absent[start:start + CHUNK])))
    return len(absent)


def _serialize(session: Session, origin: str) -> None:
    # Two watchers of one file (`gpuq up --jobs-file` and `gpuq watch`) store it in turn.
    serialize(session, hashlib.sha256(origin.encode()).hexdigest())


def _reprioritize(session: Session, priority: int, job_id: int, state: str | None,
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
    if now is None:  # pruned meanwhile
        return LineOutcome("known", job_id)
    return LineOutcome("not_applied", job_id, (
        f"job {job_id} is already {now.state or state}: the new priority {priority} "
        f"is not applied (a priority edit applies only while the job is PENDING)"))
