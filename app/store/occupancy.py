"""Who occupies the queue and the GPUs now: jobs per owner and unended state, GPUs held per
owner or project. Read at each scrape of the dashboard's /metrics."""

from __future__ import annotations

from typing import Literal

from sqlalchemy import func
from sqlmodel import Session, col, select

from app.core.states import JobState
from app.store import counts
from app.store.models import HOLDING_STATES, Job, fixed

# The states a job waits or runs in, which /metrics counts per user. (Jobs per state of
# every state come from app/store/counts.py, at any depth.)
QUEUED_STATES = (JobState.PENDING, JobState.STARTING, JobState.RUNNING, JobState.CANCELLING)


def jobs_by_owner(session: Session) -> dict[tuple[str, str], int]:
    """(owner, state) -> jobs, for QUEUED_STATES, pairs that have any: from the kept counts
    (app/store/counts.py), a few rows per owner at any depth of the queue."""
    return counts.by_owner(session, [s.value for s in QUEUED_STATES])


def held_gpus_by(session: Session, by: Literal["owner", "project"]) -> dict[str, int]:
    """GPUs that local jobs hold now (STARTING, RUNNING, CANCELLING), summed per owner or
    project, those that hold any. Conditions as literals, as the partial index of holding
    jobs has them (app/store/models.py), so that only those few rows are read."""
    group = col(Job.owner) if by == "owner" else col(Job.project)
    rows = session.exec(
        select(group, func.sum(col(Job.gpus)))
        .where(col(Job.state).in_([fixed(s) for s in HOLDING_STATES]),
               col(Job.backend) == fixed("local"), col(Job.gpus) > fixed(0))
        .group_by(group))
    return {name: int(n) for name, n in rows if n}
