"""What each reader shows an actor: the one rule (app.core.identity.sees) applied to the
queries, rows and tables the read operations return.

A named user who is not an admin sees their own jobs, launches, counts and usage in full.
Of other users' jobs they learn only that some exist (a GPU busy, counts per state, "jobs of
other users" in `gpuq why`), never an id, name, command or owner. The stack's owner and
admins see everything.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement
from sqlmodel import Session, col, select

from app.core.errors import NotPermitted
from app.core.identity import Actor, sees, sees_everyone
from app.store.models import Job, Launch

# How a reader names whoever owns what the actor may not see.
ANOTHER_USER = "another user"


def kept_to(actor: Actor | None) -> str | None:
    """The one owner whose rows `actor` sees, or None when they see everyone's."""
    return None if sees_everyone(actor) or actor is None else actor.name


def visible(actor: Actor | None, owner: Any = Job.owner) -> list[ColumnElement[bool]]:
    """The condition `sees` puts as SQL on an owner column (a job's by default): none for
    whoever sees everyone, so that their reads cost what they did before owners."""
    name = kept_to(actor)
    return [] if name is None else [col(owner) == name]


def check_sees(actor: Actor | None, jobs: Iterable[Job]) -> None:
    """Refuse, naming their ids only, jobs the actor may not see."""
    hidden = [j.id or 0 for j in jobs if not sees(actor, j.owner)]
    if hidden:
        assert actor is not None
        raise NotPermitted.for_jobs(actor.name, hidden)


def check_sees_launch(actor: Actor | None, launch: Launch) -> None:
    if not sees(actor, launch.owner):
        assert actor is not None
        raise NotPermitted(f"launch {launch.id} belongs to another user; you ({actor.name}) "
                           "may see and cancel only your own launches")


def hide_holders(session: Session, hosts: list[dict[str, Any]], actor: Actor | None) -> None:
    """Blank the job id of each GPU held by a job the actor may not see: the GPU shows busy
    (its reading stays), not by whom."""
    if sees_everyone(actor):
        return
    held = {g["job_id"] for h in hosts for g in h["gpus"] if g.get("job_id") is not None}
    owners = dict(session.exec(select(Job.id, Job.owner).where(col(Job.id).in_(held)))
                  .all()) if held else {}
    for host in hosts:
        for gpu in host["gpus"]:
            job_id = gpu.get("job_id")
            if job_id is not None and not sees(actor, owners.get(job_id, "")):
                gpu["job_id"] = None


def check_sees_everyone(actor: Actor | None, what: str) -> None:
    """Refuse a named user who is not an admin what names every user (`what`: the
    metrics, the limits table)."""
    if not sees_everyone(actor):
        assert actor is not None
        raise NotPermitted(f"{what} name every user, so they are the stack owner's and "
                           f"admins' to read; you ({actor.name}) see your own jobs and usage "
                           "(`gpuq queue`, `gpuq report`)")


def visible_shares(table: dict[str, Any], actor: Actor | None) -> dict[str, Any]:
    """A limits and fair-share table (`gpuq limits`, the GPU page) with only the rows of
    the users the actor sees: every row for whoever sees everyone, else their own user's.
    A project's row sums its members' jobs, so it is shown to those who see everyone."""
    if sees_everyone(actor):
        return table
    return {**table, "entries": [e for e in table["entries"]
                                 if e["kind"] == "user" and sees(actor, e["name"])]}
