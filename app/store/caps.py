"""Caps: the most that jobs of one user or one project may hold at once, checked in the
statement that writes a placement.

A dispatch pass decides from what it read at its start; passes, `place_head` and (later) a
worker taking its GPU's next job may decide at once on that same past. So the limit is
not only a reason to pass a job over, it is a condition of the write that moves the job
from PENDING: the UPDATE adds what the job asks to what the cap's jobs hold in the
database at that moment, and moves it only when the sum stays within the cap. Writers of
one cap are made to take turns first (`serialize`: SQLite's write lock, or a PostgreSQL
advisory lock per cap, taken in one order), so that under READ COMMITTED too the sum that
statement reads includes every placement committed before it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, literal, select
from sqlmodel import Session, col

from app.store.jobs import JOBS, serialize
from app.store.limits import Limits
from app.store.models import HOLDING_STATES, fixed

# What a cap counts over the jobs that hold their place (STARTING, RUNNING, CANCELLING):
# the GPUs of GPU jobs, local or on a batch backend, or the number of local 0-GPU jobs
# (the CPU slots of this cluster's workers).
GPUS = "gpus"
CPU_JOBS = "cpu_jobs"
_COLUMNS = {"user": JOBS.c.owner, "project": JOBS.c.project}


@dataclass(frozen=True, order=True)
class Cap:
    """At most `most` of `measure` held at once by the jobs of `kind` (user, project)
    `name`."""

    kind: str
    name: str
    measure: str
    most: int

    def held(self) -> ColumnElement[int]:
        """What the cap's jobs hold now, as a scalar subquery of the writing statement."""
        which = ([JOBS.c.gpus > fixed(0)] if self.measure == GPUS
                 else [JOBS.c.gpus == fixed(0), JOBS.c.backend == fixed("local")])
        amount = JOBS.c.gpus if self.measure == GPUS else literal(1)
        return (select(func.coalesce(func.sum(amount), 0))
                .where(col(JOBS.c.state).in_([fixed(s) for s in HOLDING_STATES]), *which,
                       _COLUMNS[self.kind] == self.name)
                .scalar_subquery())

    def key(self) -> str:
        """The hex key its writers take turns on."""
        return hashlib.sha256(f"cap:{self.kind}:{self.name}:{self.measure}".encode()
                              ).hexdigest()


def caps_of(found: Limits, owner: str, project: str, measure: str) -> list[Cap]:
    """The caps a job of `owner` in `project` is held to for `measure`: its user's and its
    project's limits of that measure (max_gpus, or max_cpu_jobs), where they are set."""
    field = "max_gpus" if measure == GPUS else "max_cpu_jobs"
    return [Cap(kind, name, measure, most)
            for kind, name in (("user", owner), ("project", project))
            if (most := getattr(found.of(kind, name), field)) is not None]


def within(session: Session, caps: Sequence[Cap], need: int) -> list[ColumnElement[bool]]:
    """The conditions that keep a placement asking for `need` within `caps`, for the
    statement that writes it in this session's transaction; writers of the same caps wait
    for this transaction to end. Caps are taken in one order, so two writers never wait
    on each other crosswise."""
    for cap in sorted(set(caps)):
        serialize(session, cap.key())
    return [cap.held() + need <= cap.most for cap in sorted(set(caps))]
