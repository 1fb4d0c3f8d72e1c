"""Operations of a shared cluster: why a job waits, and the limits and fair-share weights
of users and projects with what each runs now."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func
from sqlmodel import col, select

from app.core.errors import InvalidArguments, NotPermitted
from app.core.identity import Actor
from app.core.states import JobState
from app.ops.read import check_job_ids
from app.ops.registry import operation
from app.ops.visibility import check_sees, visible_shares
from app.runtime import Runtime
from app.store import accounting, limits
from app.store.jobs import batch_holding, get_jobs, holding
from app.store.models import Job


@operation
def why(rt: Runtime, job_id: int, actor: Actor | None = None) -> dict[str, Any]:
    """Why a job is PENDING, as a code and a sentence (`gpuq why ID`)."""
    from scheduler.dispatch.explain import explain

    check_job_ids([job_id])
    with rt.session() as session:
        job = get_jobs(session, [job_id])[0]
    check_sees(actor, [job])
    return {"job_id": job_id, "status": job.state,
            **explain(rt, [job], actor)[job_id].dump()}


@operation
def limits_table(rt: Runtime, pending: bool = True, actor: Actor | None = None
                 ) -> dict[str, Any]:
    """Every user and project that has an entry, runs GPUs, has jobs PENDING or used GPU
    time: its limits, weight, GPUs running, jobs pending (unless not `pending`: counting
    them reads every PENDING job), and fair-share usage (GPU-hours, decayed), with the
    fair-share settings. A named user who is not an admin gets their own user's row only
    (app/ops/visibility.py)."""
    return visible_shares(shares_table(rt, pending), actor)


def shares_table(rt: Runtime, count_pending: bool) -> dict[str, Any]:
    s = rt.settings
    with rt.session() as session:
        found = limits.read(session, s)
        running: dict[tuple[str, str], int] = {}
        for row in holding(session) + batch_holding(session):
            for key in (("user", row.owner), ("project", row.project)):
                running[key] = running.get(key, 0) + row.gpus
        pending: dict[tuple[str, str], int] = {}
        for kind, column in (("user", col(Job.owner)), ("project", col(Job.project))
                             ) if count_pending else ():
            for name, n in session.exec(select(column, func.count()).where(
                    col(Job.state) == JobState.PENDING.value).group_by(column)):
                pending[(kind, name)] = int(n)
        used = accounting.decayed_usage(session, time.time())
    names = sorted(set(found.entries) | running.keys() | pending.keys() | used.keys())
    rows = []
    for kind, name in names:
        entry = found.of(kind, name)
        rows.append({"kind": kind, "name": name, "max_gpus": entry.max_gpus,
                     "max_pending": entry.max_pending, "max_cpu_jobs": entry.max_cpu_jobs,
                     "weight": found.weight(kind, name),
                     "default_project": entry.default_project if kind == "user" else None,
                     "max_priority": found.max_priority(kind, name),
                     "max_time_s": entry.max_time_s, "default_time_s": entry.default_time_s,
                     "running_gpus": running.get((kind, name), 0),
                     "pending": pending.get((kind, name), 0) if count_pending else None,
                     "usage_gpu_hours": round(used.get((kind, name), 0.0) / 3600, 4)})
    return {"entries": rows, "fair_share": s.fair_share, "fair_share_by": s.fair_share_by,
            "half_life_days": s.fair_share_half_life_days,
            "file": str(limits.limits_file(s)), "open_projects": s.open_projects}


@operation
def set_limits(rt: Runtime, kind: str, name: str, values: dict[str, Any],
               actor: Actor | None = None) -> dict[str, Any]:
    """Set an admin's limits or weight for a user or project (`gpuq limits set`): the
    fields named in `values` (None clears one), the others as they were."""
    if actor is not None and not actor.admin:
        raise NotPermitted("limits are an admin's to set; ask one (gpuq limits shows them)")
    if not values:
        raise InvalidArguments("name a limit to set: --max-gpus, --max-pending, "
                               "--max-cpu-jobs, --max-priority, --max-time, --default-time, "
                               "--weight or --default-project")
    with rt.engine.begin() as conn:
        limits.write(conn, kind, name, values)
    return {"kind": kind, "name": name, "set": values}


@operation
def clear_limits(rt: Runtime, kind: str, name: str, actor: Actor | None = None
                 ) -> dict[str, Any]:
    """Drop a user's or project's entry set with `gpuq limits set` (a file's stays)."""
    if actor is not None and not actor.admin:
        raise NotPermitted("limits are an admin's to clear; ask one (gpuq limits shows them)")
    limits.check_entry(kind, name, {})
    with rt.engine.begin() as conn:
        cleared = limits.remove(conn, kind, name)
    return {"kind": kind, "name": name, "cleared": cleared}
