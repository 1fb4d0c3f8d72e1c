"""Update: change what a job asked for after it was submitted; for now its time limit.

`gpuq update ID --time T` (or `--launch L`) sets the time limit of jobs that have not
ended, waiting or running: a running one's worker reads it at its next lease renewal (a
heartbeat) and counts it from the attempt's start. A user may shorten their own jobs'
limits; only an admin may lengthen one or take it away (`--time none`): a longer limit is
more of the cluster than the job was admitted with.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, or_
from sqlalchemy import update as sql_update
from sqlmodel import col, select

from app.core.durations import format_duration, parse_duration
from app.core.errors import InvalidArguments, InvalidJobSpec, LaunchNotFound, NotPermitted
from app.core.identity import Actor, sees_everyone
from app.core.states import TERMINAL
from app.ops.read import check_job_ids, check_launch_id
from app.ops.registry import operation
from app.ops.visibility import check_sees, check_sees_launch
from app.runtime import Runtime
from app.store.jobs import get_jobs, note
from app.store.models import Job, Launch

NO_LIMIT = ("none", "unlimited", "infinite")


def _time_limit(text: str) -> int | None:
    """The new limit in seconds; None: no limit."""
    if text.strip().lower() in NO_LIMIT:
        return None
    try:
        return parse_duration(text)
    except ValueError as e:
        raise InvalidArguments(f"--{e}") from None


def _longer(new: int | None, old: int | None) -> bool:
    """Whether `new` gives a job more time than `old` (None: no limit, the most)."""
    return old is not None and (new is None or new > old)


@operation
def update(rt: Runtime, ids: list[int] | None = None, launch_id: int | None = None,
           time: str | None = None, actor: Actor | None = None) -> dict[str, Any]:
    """Set the time limit of jobs that have not ended (by id, or every job of a launch).
    A named user who is not an admin may only shorten their own jobs' limits; lengthening
    one is refused, naming the job and its limit, and nothing changes. Named jobs that had
    already ended come back in `ended`, by id, with their state."""
    if not ids and launch_id is None:
        raise InvalidJobSpec("say which jobs to update: job ids or --launch L")
    if time is None:
        raise InvalidArguments("say what to change: --time T (e.g. 2h, or none)")
    check_job_ids(ids or [])
    new = _time_limit(time)
    with rt.session() as session:
        if launch_id is not None:
            check_launch_id(launch_id)
            launch = session.get(Launch, launch_id)
            if launch is None:
                raise LaunchNotFound(f"no launch with id {launch_id}; `gpuq launches` "
                                     "lists them")
            check_sees_launch(actor, launch)
            jobs = list(session.exec(select(Job).where(col(Job.launch_id) == launch_id)))
        else:
            jobs = get_jobs(session, ids or [])
            check_sees(actor, jobs)
        ended = {j.id or 0: j.state for j in jobs if j.state in _ENDED}
        live = [j for j in jobs if j.state not in _ENDED]
        admin = sees_everyone(actor)
        if not admin:
            _refuse_longer(actor, live, new)
        # One conditional write: a job that ended meanwhile keeps its limit, and a limit a
        # user may not lengthen is not lengthened by a race with another update.
        where: list[ColumnElement[bool]] = [col(Job.id).in_([j.id for j in live]),
                                            col(Job.state).not_in(_ENDED)]
        if not admin:
            where.append(col(Job.time_limit_s).is_(None) if new is None else
                         or_(col(Job.time_limit_s).is_(None), col(Job.time_limit_s) >= new))
        updated: list[int] = list(session.scalars(
            sql_update(Job).where(*where).values(time_limit_s=new)
            .returning(col(Job.id)))) if live else []
        who = actor.name if actor is not None else "the stack's owner"
        for job_id in updated:
            note(session, job_id, f"time limit set to "
                                  f"{'none' if new is None else format_duration(new)} by {who}")
    out: dict[str, Any] = {"updated": sorted(updated),
                           "time_limit_s": new}
    if ended:
        out["ended"] = {str(i): state for i, state in sorted(ended.items())}
    return out


_ENDED = [state.value for state in TERMINAL]


def _refuse_longer(actor: Actor | None, jobs: list[Job], new: int | None) -> None:
    longer = [j for j in jobs if _longer(new, j.time_limit_s)]
    if not longer:
        return
    first = longer[0]
    assert first.time_limit_s is not None
    asked = "no limit" if new is None else format_duration(new)
    raise NotPermitted(
        f"job {first.id}'s time limit is {format_duration(first.time_limit_s)}: you "
        f"({actor.name if actor else '?'}) may shorten it, and only an admin may lengthen it "
        f"(to {asked}); give --time {format_duration(first.time_limit_s)} or less, or ask "
        "an admin")
