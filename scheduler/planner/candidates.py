"""The candidates of a planning pass: PENDING local jobs that wait for no other job, read
from their partial indexes highest priority first, one (owner, project) group at a time."""

from __future__ import annotations

import functools
import json
import time
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    Connection,
    Dialect,
    Float,
    Integer,
    Select,
    String,
    bindparam,
    false,
    or_,
    select,
)
from sqlmodel import Session, col

from app.core.states import JobState
from app.store.models import Job, fixed


class Candidate(NamedTuple):
    """The few columns of a PENDING job that placing it needs."""

    id: int
    gpus: int
    allowed_gpu_ids: list[int] | None
    attempt: int
    priority: int
    reason: str | None
    owner: str
    project: str
    submitted_at: float
    time_limit_s: int | None  # each attempt's limit; None: none (it never backfills)
    eta: float | None = None  # the expected start a pass last wrote
    eta_basis: str | None = None


CandidateQuery = Select[int | None, int, list[int] | None, int, int, str | None, str, str,
                        float, int | None, float | None, str | None]


def candidates(gpu_jobs: bool, *where: ColumnElement[bool]) -> CandidateQuery:
    """PENDING local jobs that wait for no other job, GPU jobs or 0-GPU jobs, highest
    priority first, then oldest: the order of their partial index, read without a sort
    (GPU jobs one (owner, project) group at a time: `where` names it)."""
    query = _candidates(gpu_jobs)
    return query.where(*where) if where else query


def _candidate_condition(gpu_jobs: bool) -> list[ColumnElement[bool]]:
    gpus = col(Job.gpus) > fixed(0) if gpu_jobs else col(Job.gpus) == fixed(0)
    return [col(Job.state) == fixed(JobState.PENDING.value), col(Job.waiting) == false(),
            col(Job.backend) == fixed("local"), gpus]


@functools.cache
def _candidates(gpu_jobs: bool) -> CandidateQuery:
    """Built once: the time a restart's backoff is held against is read when it runs."""
    now = bindparam("now", callable_=time.time, type_=Float)
    return (select(col(Job.id), col(Job.gpus), col(Job.allowed_gpu_ids), col(Job.attempt),
                   col(Job.priority), col(Job.reason), col(Job.owner), col(Job.project),
                   col(Job.submitted_at), col(Job.time_limit_s), col(Job.eta),
                   col(Job.eta_basis))
            .where(*_candidate_condition(gpu_jobs),
                   or_(col(Job.not_before).is_(None), col(Job.not_before) <= now))
            .order_by(col(Job.priority).desc(), col(Job.id)))


def level_heads(session: Session, below: int | None) -> list[Candidate]:
    """The first candidate of each (owner, project) group at the highest priority below
    `below` (any, when None) that has candidates, or none: a seek or two into the
    candidate index per group (a loose index scan), however many jobs each has.

    A pass runs these once per group, so they go to the driver as SQL compiled once, with
    no statement building or result processing of SQLAlchemy's on the way: that is most
    of a seek's cost, and the difference between a pass of 10 users and one of 100."""
    conn = session.connection()
    now = time.time()
    heads: list[Candidate] = []
    found = _seek(conn, "first", {"now": now, "below": 2**31 - 1 if below is None else below})
    while found is not None:
        heads.append(found)
        at = {"now": now, "priority": found.priority, "owner": found.owner,
              "project": found.project}
        found = _seek(conn, "same_owner", at) or _seek(conn, "next_owner", at)
    return heads


def next_group(which: str) -> CandidateQuery:
    """The seeks of `level_heads`: the first candidate of the highest priority below
    :below, in its first group (`first`); at :priority after the group (:owner,
    :project), the first of the owner's next project (`same_owner`), or of the next owner
    (`next_owner`). Two seeks on one column each, not one on the pair: SQLite steps
    through every row of the pair named to pass it."""
    query = candidates(True).order_by(None).order_by(
        col(Job.priority).desc(), col(Job.owner), col(Job.project), col(Job.id)).limit(1)
    priority, owner = bindparam("priority", type_=Integer), bindparam("owner", type_=String)
    if which == "first":
        return query.where(col(Job.priority) < bindparam("below", type_=Integer))
    if which == "same_owner":
        return query.where(col(Job.priority) == priority, col(Job.owner) == owner,
                           col(Job.project) > bindparam("project", type_=String))
    return query.where(col(Job.priority) == priority, col(Job.owner) > owner)


def _seek(conn: Connection, which: str, values: dict[str, Any]) -> Candidate | None:
    sql, names, positional, fixed_values = _compiled(which, conn.dialect)
    values = {**fixed_values, **values}
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql, [values[n] for n in names] if positional else values)
        row = cursor.fetchone()
    finally:
        cursor.close()
    if row is None:
        return None
    ids = row[2]
    return Candidate._make((*row[:2], json.loads(ids) if isinstance(ids, str) else ids,
                            *row[3:]))


@functools.cache
def _compiled(which: str, dialect: Dialect
              ) -> tuple[str, list[str], bool, dict[str, Any]]:
    """The SQL of a seek, its parameters' names in order, whether they go by position, and
    the values it fixes (its LIMIT); the fixed conditions (models.fixed) written in, as the
    partial index needs."""
    ours = {"now": 0.0, "below": 0, "priority": 0, "owner": "", "project": ""}
    compiled = next_group(which).compile(dialect=dialect)
    state = compiled.construct_expanded_state(ours)
    fixed_values = {k: v for k, v in state.parameters.items() if k not in ours}
    return (state.statement, list(state.positiontup or []), bool(compiled.positional),
            fixed_values)
