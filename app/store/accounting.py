"""Accounting: the record of every attempt, written in the transaction that ends it, and
each user's and project's GPU use decayed with the fair-share half-life.

An attempt ends wherever a job leaves a state that holds its GPUs (STARTING, RUNNING,
CANCELLING) for one that does not: the one transition function (app/store/jobs.py) hands
those rows here. Its GPU-seconds are its GPUs times the time from its start (RUNNING) to
its end; an attempt that never ran is recorded with none. Its outcome is the state the job
went to: a terminal state, or RECOVERING (a failure with a restart to come) or PENDING
(it never started, and is routed again).

Usage is kept per user and per project as GPU-seconds decayed to a time `at`: adding an
attempt decays the stored figure to the attempt's end and adds it, in one upsert, so that
readers decay it again to their own now. The changes of a transaction are written just
before it commits, sorted by key, as app/store/counts.py writes its own, so that two
transactions never wait on each other's rows crosswise.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Connection, Insert, Table, case, event, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session, col

from app.core.states import TERMINAL, JobState
from app.store.models import Attempt, Job, Usage

ATTEMPTS = cast(Table, Attempt.__table__)  # type: ignore[attr-defined]
USAGE = cast(Table, Usage.__table__)  # type: ignore[attr-defined]
# The half-life is the engine's (app/store/db.py sets it from the settings).
HALF_LIFE_OPTION = "gpuq_half_life_s"
DEFAULT_HALF_LIFE_S = 7 * 86400.0
_KEY = "gpuq_usage"  # in Session.info: the usage the open transaction adds

# What the transition function returns of a job whose attempt ended.
ENDED_COLUMNS = (col(Job.id), col(Job.attempt), col(Job.owner), col(Job.project),
                 col(Job.launch_id), col(Job.backend), col(Job.host), col(Job.gpu_ids),
                 col(Job.gpus), col(Job.started_at), col(Job.submitted_at))


def record_ends(session: Session, rows: Sequence[Sequence[Any]], outcome: str,
                ended_at: float) -> None:
    """The attempts of these jobs (ENDED_COLUMNS rows) ended at `ended_at` in `outcome`."""
    records = []
    for (job_id, attempt, owner, project, launch_id, backend, host, gpu_ids, gpus,
         started_at, submitted_at) in rows:
        span = max(0.0, ended_at - started_at) if started_at is not None else 0.0
        records.append({
            "job_id": job_id, "attempt": attempt, "owner": owner, "project": project,
            "launch_id": launch_id, "backend": backend, "host": host, "gpu_ids": gpu_ids,
            "gpus": gpus, "started_at": started_at, "ended_at": ended_at,
            "gpu_seconds": span * gpus, "outcome": outcome,
            "wait_s": max(0.0, started_at - submitted_at)
            if attempt == 1 and started_at is not None else None})
        if span * gpus > 0:  # a batch backend's GPUs are charged too, as they count running
            changes = session.info.setdefault(_KEY, {})
            for key in (("project", project), ("user", owner)):
                used, at = changes.get(key, (0.0, 0.0))
                changes[key] = (used + span * gpus, max(at, ended_at))
    if records:
        session.connection().execute(insert(ATTEMPTS), records)


def note_figures(session: Session, job_id: int, attempt: int, **figures: float | None) -> None:
    """Figures of an attempt from the worker that ran it: the GPU monitor's (peak_memory_mb,
    mean_utilization_pct) and its container's (cpu_s, peak_host_memory_mb); those given as
    None are left as they are."""
    values = {name: value for name, value in figures.items() if value is not None}
    if values:
        session.connection().execute(
            ATTEMPTS.update().where(ATTEMPTS.c.job_id == job_id,
                                    ATTEMPTS.c.attempt == attempt).values(**values))


@event.listens_for(OrmSession, "before_commit")
def _flush(session: OrmSession) -> None:
    changes = session.info.pop(_KEY, None)
    if not changes:
        return
    conn = session.connection()
    rows = [{"kind": kind, "name": name, "gpu_seconds": used, "at": at}
            for (kind, name), (used, at) in sorted(changes.items())]
    conn.execute(_upsert(conn.dialect.name, half_life_s(conn)), rows)


@event.listens_for(OrmSession, "after_rollback")
def _forget(session: OrmSession) -> None:
    session.info.pop(_KEY, None)


def half_life_s(conn: Connection) -> float:
    return float(conn.get_execution_options().get(HALF_LIFE_OPTION, DEFAULT_HALF_LIFE_S))


@functools.cache
def _upsert(dialect: str, half_life: float) -> Insert:
    """Decay the stored usage and the added one to the later of their times, and add."""
    stmt = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(USAGE)
    old, new = USAGE.c, stmt.excluded
    later = (func.greatest if dialect == "postgresql" else func.max)(old.at, new.at)

    def decayed(used: Any, at: Any) -> Any:
        return used * func.power(0.5, (later - at) / half_life)

    return stmt.on_conflict_do_update(
        index_elements=[USAGE.c.kind, USAGE.c.name],
        set_={"gpu_seconds": decayed(old.gpu_seconds, old.at)
              + decayed(new.gpu_seconds, new.at), "at": later})


def decayed_usage(session: Session | Connection, now: float | None = None
                  ) -> dict[tuple[str, str], float]:
    """Every user's and project's usage, in GPU-seconds decayed to `now`."""
    conn = session.connection() if isinstance(session, Session) else session
    half_life, now = half_life_s(conn), time.time() if now is None else now
    return {(kind, name): used * 0.5 ** (max(0.0, now - at) / half_life)
            for kind, name, used, at in conn.execute(
                select(USAGE.c.kind, USAGE.c.name, USAGE.c.gpu_seconds, USAGE.c.at))}


# The outcomes of an attempt that ended its job; the others (RECOVERING, PENDING, UNKNOWN)
# leave it to run again, or to be settled.
ENDING_OUTCOMES = sorted(state.value for state in TERMINAL)
GROUPS = {"user": ATTEMPTS.c.owner, "project": ATTEMPTS.c.project,
          "launch": ATTEMPTS.c.launch_id}


def report(session: Session, since: float, by: str, owner: str | None = None
           ) -> dict[str, dict[str, Any]]:
    """Attempts that ended since `since` (of one owner's when `owner` is given), added up by
    user, project or launch in the database: GPU-hours, jobs, attempts, the success rate,
    mean wait to a first start, mean utilisation and peak memory.

    The success rate is per job: of the jobs whose last attempt in the window ended them
    (not one that runs again), the share whose last attempt SUCCEEDED; a job that failed
    and then succeeded on a restart is a success."""
    a = ATTEMPTS.c
    window = [a.ended_at >= since, *([a.owner == owner] if owner is not None else [])]
    # Each attempt in the window, numbered from its job's last (one sort, by job).
    ranked = select(
        GROUPS[by].label("key"), a.job_id, a.gpu_seconds, a.outcome, a.wait_s,
        a.mean_utilization_pct, a.peak_memory_mb,
        func.row_number().over(partition_by=a.job_id, order_by=a.id.desc()).label("nth"),
    ).where(*window).subquery("ranked")
    r = ranked.c
    last = r.nth == 1
    ended = func.sum(case((last & r.outcome.in_(ENDING_OUTCOMES), 1), else_=0))
    succeeded = func.sum(case((last & (r.outcome == JobState.SUCCEEDED.value), 1), else_=0))
    query = (select(r.key, func.sum(r.gpu_seconds), func.count(func.distinct(r.job_id)),
                    func.count(), ended, succeeded, func.avg(r.wait_s),
                    func.avg(r.mean_utilization_pct), func.max(r.peak_memory_mb))
             .group_by(r.key).order_by(r.key))
    out = {}
    for key, used, jobs, attempts, n_ended, n_ok, wait, util, peak in (
            session.connection().execute(query)):
        out["-" if key is None else str(key)] = {
            "gpu_hours": float(used or 0) / 3600, "gpu_seconds": float(used or 0),
            "jobs": int(jobs), "attempts": int(attempts),
            "success_rate": int(n_ok or 0) / int(n_ended) if n_ended else None,
            "mean_wait_s": None if wait is None else float(wait),
            "mean_utilization_pct": None if util is None else float(util),
            "peak_memory_mb": None if peak is None else int(peak)}
    return out


def of_job(session: Session, job_id: int) -> list[dict[str, Any]]:
    """One job's attempts, first first."""
    rows = session.connection().execute(
        select(ATTEMPTS).where(ATTEMPTS.c.job_id == job_id).order_by(ATTEMPTS.c.attempt,
                                                                      ATTEMPTS.c.id))
    return [dict(row._mapping) for row in rows]


# What seconds() reads, for a form or an API to check first.
SPAN_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?[dhmsDHMS]?\s*$"


def seconds(span: str) -> float:
    """`7d`, `12h`, `30m`, `90s` or a number of seconds, as seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    text = span.strip().lower()
    number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        value = float(number) * unit
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        from app.core.errors import InvalidArguments

        raise InvalidArguments(f"--since takes a span such as 7d, 12h, 30m or 90s, got "
                               f"{span!r}")
    return value
