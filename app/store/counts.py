"""Jobs per launch, owner and state, kept in the transaction of every change.

Three writers change how many jobs are in a state: a submission (app/store/jobs.py:
create_jobs), a transition (jobs._move) and the pruning of finished jobs
(app/store/retention.py). Each notes its change in its session; the session adds the
changes to `job_counts` just before it commits, in one order (launch, owner, state), so that
two transactions never wait on each other's rows crosswise, and a rolled-back transaction
adds nothing. Reading a total is then a sum over a few rows, at any depth of the queue,
where counting the jobs themselves reads every one of them.

Anything else that writes a job's state (a hand-edited database) leaves the counts behind
the jobs: `gpuq db recount` counts them again.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, cast

from sqlalchemy import Insert, Table, delete, event, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session, col

from app.store.db import begin_writing
from app.store.models import Job, JobCount

COUNTS = cast(Table, JobCount.__table__)  # type: ignore[attr-defined]
SLOTS = 4
_KEY = "gpuq_counts"  # in Session.info: the changes of the open transaction


Key = tuple[int, str, str]  # launch (0: none), owner, state


def _changes(session: Session) -> Counter[Key]:
    return cast(Counter[Key], session.info.setdefault(_KEY, Counter()))


def note(session: Session, launch_id: int | None, owner: str, state: str, delta: int
         ) -> None:
    """`delta` jobs of the launch (None: outside any) and owner came into `state` (or left
    it)."""
    if delta:
        _changes(session)[(launch_id or 0, owner, state)] += delta


def note_moves(session: Session, jobs: Iterable[tuple[int | None, str]], source: str,
               target: str) -> None:
    """These jobs ((launch, owner), one entry per job) moved from `source` to `target`."""
    for (launch_id, owner), n in Counter(jobs).items():
        note(session, launch_id, owner, source, -n)
        note(session, launch_id, owner, target, n)


def forget_launches(session: Session, launch_ids: Sequence[int]) -> None:
    """Launches deleted with all their jobs: their counts go, changes of this transaction
    included."""
    changes, gone = _changes(session), set(launch_ids)
    for key in [k for k in changes if k[0] in gone]:
        del changes[key]
    session.execute(delete(COUNTS).where(COUNTS.c.launch_id.in_(launch_ids)))


@event.listens_for(OrmSession, "before_commit")
def _flush(session: OrmSession) -> None:
    changes = session.info.pop(_KEY, None)
    if not changes:
        return
    slot = os.getpid() % SLOTS
    rows = [{"launch_id": launch_id, "owner": owner, "state": state, "slot": slot, "n": delta}
            for (launch_id, owner, state), delta in sorted(changes.items()) if delta]
    if rows:
        conn = session.connection()
        conn.execute(_upsert(conn.dialect.name), rows)


@functools.cache
def _upsert(dialect: str) -> Insert:
    """Add to a count, or start it: one statement for every change of a transaction."""
    stmt = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(COUNTS)
    return stmt.on_conflict_do_update(
        index_elements=[COUNTS.c.launch_id, COUNTS.c.owner, COUNTS.c.state, COUNTS.c.slot],
        set_={"n": COUNTS.c.n + stmt.excluded.n})


@event.listens_for(OrmSession, "after_rollback")
def _forget(session: OrmSession) -> None:
    session.info.pop(_KEY, None)


def totals(session: Session) -> dict[str, int]:
    """Jobs per state, every state that has any."""
    rows = session.execute(select(COUNTS.c.state, func.sum(COUNTS.c.n))
                           .group_by(COUNTS.c.state))
    return {state: int(n) for state, n in rows if n}


def by_owner(session: Session, states: Sequence[str]) -> dict[tuple[str, str], int]:
    """(owner, state) -> jobs, for `states`, pairs that have any."""
    rows = session.execute(select(COUNTS.c.owner, COUNTS.c.state, func.sum(COUNTS.c.n))
                           .where(COUNTS.c.state.in_(states))
                           .group_by(COUNTS.c.owner, COUNTS.c.state))
    return {(owner, state): int(n) for owner, state, n in rows if n}


def of_launches(session: Session, launch_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    """Replicas per state of each launch named."""
    found: dict[int, dict[str, int]] = {}
    if not launch_ids:
        return found
    rows = session.execute(
        select(COUNTS.c.launch_id, COUNTS.c.state, func.sum(COUNTS.c.n))
        .where(COUNTS.c.launch_id.in_(launch_ids))
        .group_by(COUNTS.c.launch_id, COUNTS.c.state))
    for launch_id, state, n in rows:
        if n:
            found.setdefault(int(launch_id), {})[state] = int(n)
    return found


def total(session: Session, states: Sequence[str] | None = None,
          launch_id: int | None = None) -> int:
    """How many jobs are in `states` (any, when None), of one launch (any, when None)."""
    query = select(func.coalesce(func.sum(COUNTS.c.n), 0))
    if states is not None:
        query = query.where(COUNTS.c.state.in_(states))
    if launch_id is not None:
        query = query.where(COUNTS.c.launch_id == launch_id)
    return int(session.scalar(query) or 0)


def recount(session: Session) -> dict[str, Any]:
    """Count every job again and replace the counts (`gpuq db recount`). On PostgreSQL the
    jobs table is locked against writes meanwhile, so that no change falls between the
    count and its replacement; SQLite writes one transaction at a time anyway."""
    conn = session.connection()
    begin_writing(conn)
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("LOCK TABLE jobs IN SHARE MODE")
    session.info.pop(_KEY, None)
    conn.execute(delete(COUNTS))
    launch = func.coalesce(col(Job.launch_id), 0)
    rows = [{"launch_id": int(lid), "owner": owner, "state": state, "slot": 0, "n": int(n)}
            for lid, owner, state, n in conn.execute(
                select(launch, col(Job.owner), col(Job.state), func.count())
                .group_by(launch, col(Job.owner), col(Job.state)))]
    if rows:
        conn.execute(insert(COUNTS), rows)
    return {"rows": len(rows), "jobs": sum(r["n"] for r in rows)}
