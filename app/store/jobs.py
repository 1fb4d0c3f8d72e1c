"""The job store: bulk creation, the duplicate check, queries, and the one transition
function."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from sqlalchemy import ColumnElement, Select, Table, insert, or_, text, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from app.core.errors import DuplicateJob, IllegalTransition, InvalidJobSpec, JobNotFound
from app.core.identity import Actor, stack_owner
from app.core.states import TERMINAL, JobState, sources_of
from app.store import accounting, counts, dependencies, payload_store
from app.store.db import begin_writing
from app.store.models import HOLDING_STATES, Job, JobEvent, Launch, event_row, fixed
from app.store.spec import JobSpec

if TYPE_CHECKING:
    import redis

# Writes of the hot path go to the tables themselves: an ORM bulk UPDATE also evaluates its
# WHERE against every object the session holds (none here), at a cost per statement.
JOBS = cast(Table, Job.__table__)  # type: ignore[attr-defined]
JOB_EVENTS = cast(Table, JobEvent.__table__)  # type: ignore[attr-defined]

# One launch is one INSERT and one transaction: a bound keeps a typo from filling the table.
MAX_JOBS_PER_LAUNCH = 100_000


def create_jobs(session: Session, spec: JobSpec, num_jobs: int, *, launch: bool,
                owner: str | None = None, viewer: Actor | None = None
                ) -> tuple[int | None, list[int]]:
    """Insert `num_jobs` PENDING rows in one statement, owned by `owner` (the stack's owner
    when None), in the spec's project (the owner's name when it names none); return
    (launch id, job ids). The jobs they run after must be ones `viewer` sees (by default,
    the owner as a user who is no admin)."""
    owner = stack_owner().name if owner is None else owner
    viewer = viewer or (stack_owner() if owner == stack_owner().name else Actor(owner))
    project = spec.project or owner
    if not 1 <= num_jobs <= MAX_JOBS_PER_LAUNCH:
        raise InvalidJobSpec(f"--num-jobs must be between 1 and {MAX_JOBS_PER_LAUNCH:,}; "
                             "split a larger sweep into several launches")
    now = time.time()
    launch_id = None
    if launch:
        row = Launch(name=spec.name, num_jobs=num_jobs, command=spec.command, created_at=now,
                     payload_key=spec.payload_key, owner=owner, project=project)
        session.add(row)
        session.flush()
        launch_id = row.id
    waiting = bool(spec.after) and dependencies.must_wait(session, spec.after, viewer)
    base = spec.model_dump(exclude={"after"})  # its edges go to job_dependencies
    base.update(content_hash=spec.content_hash(), state=JobState.PENDING.value,
                submitted_at=now, launch_id=launch_id, num_jobs=num_jobs,
                waiting=waiting, owner=owner, project=project,
                reason=f"after jobs {', '.join(map(str, spec.after))}" if waiting else None)
    rows = [{**base, "rank": rank} for rank in range(num_jobs)]
    conn = session.connection()  # Core: the ORM's bulk insert costs more than the rows
    ids = [i for i in conn.scalars(
        insert(JOBS).returning(JOBS.c.id, sort_by_parameter_order=True), rows) if i is not None]
    counts.note(session, launch_id, owner, JobState.PENDING.value, len(ids))
    if spec.after:
        dependencies.record(session, ids, spec.after)
    conn.execute(insert(JOB_EVENTS), [
        event_row(job_id, now, None, JobState.PENDING.value, "submitted") for job_id in ids
    ])
    return launch_id, ids


def refuse_duplicate(session: Session, spec: JobSpec, owner: str | None = None) -> None:
    """Refuse a job identical to one of the same owner's not yet ended; the database is the
    only memory. (Another user's identical job is theirs: naming it would tell of it.)

    Call it first in the transaction that stores the job: the check and the insert then
    hold a lock that an identical submission waits on, so that only one of two concurrent
    identical submissions is accepted."""
    digest = spec.content_hash()
    serialize(session, digest)
    found = session.exec(
        select(Job.id, Job.state).where(
            col(Job.content_hash) == digest, col(Job.launch_id).is_(None),
            col(Job.owner) == (stack_owner().name if owner is None else owner),
            col(Job.state).not_in([s.value for s in TERMINAL]))
        .order_by(col(Job.id)).limit(1)).first()
    if found is not None:
        job_id, state = found
        raise DuplicateJob(f"an identical job {job_id} is already {state}; "
                           "pass --allow-duplicate to queue another")


# The first key of the two-key advisory locks that serialize checks of one content hash
# ("gpuq"); PostgreSQL keeps two-key locks apart from the one-key lock of migrations.
PG_LOCK_CLASS = 0x67707571


def serialize(session: Session, key: str) -> None:
    """Until this transaction ends, make every other transaction that serializes on the
    same hex `key` wait: SQLite takes its database write lock now (BEGIN IMMEDIATE; it has
    no finer lock); PostgreSQL a transaction-scoped advisory lock on the key."""
    conn = session.connection()
    begin_writing(conn)
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:cls, :key)"),
                     {"cls": PG_LOCK_CLASS, "key": int(key[:8], 16) - 2**31})


def transition(session: Session, target: JobState, reason: str | None,
               where: Sequence[ColumnElement[bool]], values: dict[str, Any] | None = None,
               only_from: Sequence[JobState] | None = None) -> list[int]:
    """Move every job matching `where` whose state allows it to `target`; log each move.

    Jobs in states that cannot reach `target` are left as they are; the ids that moved are
    returned so that the caller can tell. Jobs that ended settle their dependents.
    """
    moved = _move(session, target, reason, where, values, only_from)
    if moved and target.terminal:
        _settle_dependents(session, moved, target)
    return moved


def _move(session: Session, target: JobState, reason: str | None,
          where: Sequence[ColumnElement[bool]], values: dict[str, Any] | None,
          only_from: Sequence[JobState] | None) -> list[int]:
    """`transition` without settling dependents."""
    now = time.time()
    moved: list[int] = []
    events: list[dict[str, Any]] = []
    if target is JobState.STARTING:  # a new attempt: it has not run yet
        values = {"started_at": None, **(values or {})}
    if target.terminal and (values or {}).get("ended_at") is None:
        values = {**(values or {}), "ended_at": now}  # every end is dated: retention prunes by it
    for source in sources_of(target):
        if only_from is not None and source not in only_from:
            continue
        # An attempt ends where a job leaves the states that hold its GPUs.
        ends = source in HOLDING and target not in HOLDING
        stmt = (update(JOBS).where(*where, col(Job.state) == source.value)
                .values(state=target.value, reason=reason, **(values or {}))
                .returning(col(Job.launch_id), col(Job.owner),
                           *accounting.ENDED_COLUMNS if ends else (col(Job.id),)))
        rows = session.connection().execute(stmt).all()  # Core: no ORM bulk-update path
        ids = [row[2] for row in rows if row[2] is not None]
        counts.note_moves(session, ((row[0], row[1]) for row in rows), source.value,
                          target.value)
        if ends and rows:
            accounting.record_ends(session, [row[2:] for row in rows], target.value,
                                   (values or {}).get("ended_at") or now)
        moved.extend(ids)
        events.extend(event_row(i, now, source.value, target.value, reason) for i in ids)
    if events:
        session.connection().execute(insert(JOB_EVENTS), events)
    return moved


def _settle_dependents(session: Session, ended: list[int], state: JobState) -> None:
    """Release the jobs waiting on `ended`, or cancel them when they can never start, and
    so on down the chain: level by level in a loop, since a chain may be thousands long."""
    while ended:
        which = f"job {ended[0]}" if len(ended) == 1 else "a job"
        doomed = dependencies.settle_dependents(session, ended, state)
        ended = _cancel(session, doomed, f"{which} it runs after ended {state.value}")
        state = JobState.CANCELLED


def cancel_waiting(session: Session, job_ids: Sequence[int], reason: str) -> None:
    """Cancel jobs still waiting on others that will never all succeed, and the jobs that
    wait on them."""
    _settle_dependents(session, _cancel(session, job_ids, reason), JobState.CANCELLED)


def _cancel(session: Session, job_ids: Sequence[int], reason: str) -> list[int]:
    cancelled: list[int] = []
    for chunk in dependencies.chunks(job_ids):
        cancelled.extend(_move(session, JobState.CANCELLED, reason, [col(Job.id).in_(chunk)],
                               {"ended_at": time.time(), "waiting": False},
                               only_from=[JobState.PENDING]))
    return cancelled


def note(session: Session, job_id: int, reason: str) -> None:
    """Record an event that is not a state change (a skipped preflight, say)."""
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound.for_ids([job_id])
    session.execute(insert(JobEvent), [event_row(job_id, time.time(), job.state, job.state,
                                                 reason)])


def move(session: Session, job_id: int, target: JobState, reason: str | None = None,
         values: dict[str, Any] | None = None,
         only_from: Sequence[JobState] | None = None) -> None:
    """Move one job or raise IllegalTransition naming its current state."""
    if transition(session, target, reason, [col(Job.id) == job_id], values, only_from):
        return
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound.for_ids([job_id])
    raise IllegalTransition(f"job {job_id} is {job.state}; it cannot become {target.value}")


def get_jobs(session: Session, ids: Sequence[int]) -> list[Job]:
    jobs = list(session.exec(select(Job).where(Job.id.in_(ids))))  # type: ignore[union-attr]
    missing = sorted(set(ids) - {job.id for job in jobs if job.id is not None})
    if missing:
        raise JobNotFound.for_ids(missing)
    return jobs


def drop_payload_if_finished(session: Session, r: redis.Redis, job_id: int,
                             launch_id: int | None, payload_key: str | None) -> bool:
    """Delete a launch's payload (its database row and its Redis copy) once none of its
    replicas can run again."""
    if payload_key is None:
        return False
    scope = col(Job.launch_id) == launch_id if launch_id is not None else col(Job.id) == job_id
    active = session.connection().execute(select(JOBS.c.id).where(
        scope, col(Job.state).not_in([s.value for s in TERMINAL])).limit(1)).first()
    if active is not None:
        return False
    payload_store.drop(session, r, payload_key)
    return True


# The states in which an attempt holds its GPUs and its lease.
HOLDING = tuple(JobState(s) for s in HOLDING_STATES)


def attempt_is(job_id: int, attempt: int) -> list[ColumnElement[bool]]:
    """The fence of every write an attempt makes: this job, at this attempt."""
    return [col(Job.id) == job_id, col(Job.attempt) == attempt]


class Renewed(NamedTuple):
    """What a renewal reads back of its attempt: its state, and what its time limit is
    counted from and how long it is (`gpuq update --time` may change it while it runs)."""

    state: str
    started_at: float | None
    time_limit_s: int | None


def renew_lease(session: Session, job_id: int, attempt: int,
                lease_s: float) -> Renewed | None:
    """Extend an attempt's lease; return the job's state and time limit, or None when the
    attempt holds no lease any more (a newer attempt, an ended job, or a lease that ran
    out: an attempt whose lease ran out may already run elsewhere, and is never revived)."""
    now = time.time()
    row = session.connection().execute(
        update(JOBS).where(*attempt_is(job_id, attempt),
                          col(Job.state).in_([s.value for s in HOLDING]),
                          or_(col(Job.lease_until).is_(None), col(Job.lease_until) >= now))
        .values(lease_until=now + lease_s)
        .returning(col(Job.state), col(Job.started_at), col(Job.time_limit_s))).first()
    return None if row is None else Renewed._make(row)


class Holding(NamedTuple):
    """A local attempt that holds GPUs, as the dispatcher reads it each pass."""

    id: int
    host: str | None
    gpu_ids: list[int] | None
    gpus: int
    owner: str
    project: str
    started_at: float | None
    time_limit_s: int | None  # the attempt's limit from its start: when its GPUs free


def holding(session: Session) -> list[Holding]:
    """Every local attempt that holds GPUs in the database: the truth the dispatcher checks
    beside Redis's reservations, and what limits and fair share count as running."""
    return [Holding._make(row) for row in session.connection().execute(holding_query())]


def batch_holding(session: Session) -> list[Holding]:
    """Every batch job that holds GPUs on its backend (STARTING: being or submitted,
    RUNNING, CANCELLING): what limits and fair share count as running beside the local
    attempts, though no host of this cluster holds them."""
    return [Holding._make(row) for row in session.connection().execute(
        sa_select(col(Job.id), col(Job.host), col(Job.gpu_ids), col(Job.gpus),
                  col(Job.owner), col(Job.project), col(Job.started_at),
                  col(Job.time_limit_s)).where(
            col(Job.state).in_([fixed(s) for s in HOLDING_STATES]),
            col(Job.backend) != fixed("local"), col(Job.gpus) > fixed(0)))]


def cpu_slot_holders(session: Session) -> list[tuple[str, str]]:
    """(owner, project) of every local 0-GPU job that holds a CPU slot (STARTING, RUNNING,
    CANCELLING): a few rows, however many wait."""
    return [(owner, project) for owner, project in session.connection().execute(
        sa_select(col(Job.owner), col(Job.project)).where(
            col(Job.state).in_([fixed(s) for s in HOLDING_STATES]),
            col(Job.backend) == fixed("local"), col(Job.gpus) == fixed(0)))]


def held_gpus(rows: Sequence[Holding]) -> set[tuple[str, int]]:
    """Every (host, GPU index) these attempts hold."""
    return {(row.host, i) for row in rows if row.host for i in row.gpu_ids or []}


@functools.cache
def holding_query() -> Select[int | None, str | None, list[int] | None, int, str, str,
                              float | None, int | None]:
    """Its conditions written as literals, as the partial index that serves it has them
    (app/store/models.py): a planner matches such an index only against values it sees."""
    return sa_select(col(Job.id), col(Job.host), col(Job.gpu_ids), col(Job.gpus),
                     col(Job.owner), col(Job.project), col(Job.started_at),
                     col(Job.time_limit_s)).where(
        col(Job.state).in_([fixed(s) for s in HOLDING_STATES]),
        col(Job.backend) == fixed("local"), col(Job.gpus) > fixed(0))


def batch_pending(backend: str, now: float) -> SelectOfScalar[Job]:
    """A batch backend's PENDING jobs past their backoff, oldest first: its conditions
    written as literals, as the partial index of batch jobs waiting has them
    (app/store/models.py, BATCH_PENDING_INDEX)."""
    return select(Job).where(
        col(Job.state) == fixed(JobState.PENDING.value), col(Job.backend) != fixed("local"),
        col(Job.backend) == backend,
        or_(col(Job.not_before).is_(None), col(Job.not_before) <= now)).order_by(col(Job.id))
