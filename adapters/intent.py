"""Submission intent: what a sync records of a backend call before and after making it.

A sync first moves the rows it is about to submit PENDING -> STARTING (attempt + 1, fenced
on state and attempt, so that of two syncs only one ever takes a row), then calls the
backend with a tag naming the first job, its new attempt and the part's size, then records
the backend ids. A sync that dies between the two writes leaves STARTING rows without a
backend id: the next sync looks their tag up at the backend and adopts what it finds.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import update
from sqlmodel import Session, col, select

from app.core.accounts import RunAs
from app.core.errors import GpuqError
from app.core.settings import Settings
from app.core.states import JobState
from app.store import limits
from app.store.caps import GPUS, caps_of, within
from app.store.jobs import transition
from app.store.models import Job

TAG_PREFIX = "gpuq"


class SubmitRefused(GpuqError):
    """The backend refused a submission: it surely runs nothing of it."""

    code = "submit_refused"


@dataclass
class Submission:
    """Replicas of one launch (or one job) to submit together, as an array where the
    backend has arrays. `env` is what every replica's runner needs beyond its rank."""

    jobs: list[Job]
    env: dict[str, str]
    gpus: int
    name: str
    workdir: str | None = None
    tag: str = ""  # the name to submit under, found again by tagged() (adapters/intent.py)
    # The job's secret variables, unsealed: a backend passes them through its own secret
    # store, never in `env`, the payload, a job's parameters or a file others can read.
    secrets: dict[str, str] = field(default_factory=dict)
    # The OS account its runners run as (a named user's, where the stack runs as root and
    # the backend can), or None for the stack's own.
    account: RunAs | None = None


def contiguous_parts(jobs: Sequence[Job], limit: int) -> list[list[Job]]:
    """Jobs in runs of consecutive ranks of at most `limit`: each run is one array whose
    index i is rank `run[0].rank + i` (the runner adds GPUQ_RANK_OFFSET)."""
    parts: list[list[Job]] = []
    for job in sorted(jobs, key=lambda j: j.rank):
        last = parts[-1] if parts else None
        if last and job.rank == last[-1].rank + 1 and len(last) < limit:
            last.append(job)
        else:
            parts.append([job])
    return parts


def install_id(settings: Settings) -> str:
    """A short name for this gpuq installation (its database and home), so that tags of two
    installations sharing a cluster, or of two test runs, never match each other."""
    seed = f"{settings.effective_database_url()}|{settings.home}"
    return hashlib.sha256(seed.encode()).hexdigest()[:8]


def tag(install: str, first: Job, count: int) -> str:
    """The name a part is submitted under: `gpuq-<install>-<job id>-<attempt>-<count>`, the
    first job of the part and the attempt it is submitted as; index i is rank first + i."""
    return f"{TAG_PREFIX}-{install}-{first.id}-{first.attempt}-{count}"


def parse(install: str, name: str) -> tuple[int, int, int] | None:
    """(first job id, attempt, count) of a tag of this installation, else None."""
    head = f"{TAG_PREFIX}-{install}-"
    if not name.startswith(head):
        return None
    fields = name[len(head):].split("-")
    if len(fields) != 3 or not all(f.isdigit() for f in fields):
        return None
    job_id, attempt, count = (int(f) for f in fields)
    return job_id, attempt, count


def claim(session: Session, jobs: Sequence[Job], backend: str,
          settings: Settings | None = None) -> list[Job]:
    """Move `jobs` (of one attempt) to STARTING as their next attempt before they are
    submitted; return those this sync took (another sync, or a cancel, may have moved the
    rest). The returned rows carry their new attempt. With `settings`, a job whose GPUs
    would take its user or project over max_gpus (local and batch jobs together) is not
    taken: it waits PENDING, as a local job does."""
    if not jobs:
        return []
    attempt = jobs[0].attempt
    assert all(j.attempt == attempt for j in jobs)
    found = limits.read(session, settings, strict=False) if settings is not None else None
    capped = {j.id: caps_of(found, j.owner, j.project, GPUS)
              for j in jobs if found is not None and j.gpus > 0}
    moves = {"attempt": attempt + 1, "dispatched_at": time.time(), "backend_id": None}
    why = f"submitting to {backend}"
    if not any(capped.values()):
        taken = set(transition(session, JobState.STARTING, why,
                               [col(Job.id).in_([j.id for j in jobs]),
                                col(Job.attempt) == attempt],
                               moves, only_from=[JobState.PENDING]))
    else:  # one by one, each within its caps as they stand after the one before
        taken = set()
        for job in jobs:
            taken.update(transition(
                session, JobState.STARTING, why,
                [col(Job.id) == job.id, col(Job.attempt) == attempt,
                 *within(session, capped.get(job.id, []), job.gpus)],
                moves, only_from=[JobState.PENDING]))
    session.commit()
    claimed = [j for j in jobs if j.id in taken]
    for job in claimed:
        job.attempt, job.state, job.backend_id = attempt + 1, JobState.STARTING.value, None
    return claimed


def record(session: Session, jobs: Sequence[Job], backend_ids: Sequence[str]) -> list[str]:
    """Record the backend ids of submitted rows (still of the attempt submitted, and with no
    id yet); return the backend ids of those a cancel reached meanwhile (CANCELLING)."""
    cancelling: list[str] = []
    for job, backend_id in zip(jobs, backend_ids, strict=True):
        found = session.execute(
            update(Job).where(col(Job.id) == job.id, col(Job.attempt) == job.attempt,
                              col(Job.backend_id).is_(None),
                              col(Job.state).in_([JobState.STARTING.value,
                                                  JobState.CANCELLING.value]))
            .values(backend_id=backend_id).returning(col(Job.state))).first()
        if found is not None and found[0] == JobState.CANCELLING.value:
            cancelling.append(backend_id)
    session.commit()
    return cancelling


def release(session: Session, jobs: Sequence[Job], reason: str, retry_at: float) -> None:
    """Rows the backend surely did not take: STARTING ones wait again (until `retry_at`),
    those cancelled meanwhile end CANCELLED, since nothing of theirs runs anywhere."""
    for job in jobs:
        where = [col(Job.id) == job.id, col(Job.attempt) == job.attempt,
                 col(Job.backend_id).is_(None)]
        transition(session, JobState.PENDING, reason, where, {"not_before": retry_at},
                   only_from=[JobState.STARTING])
        transition(session, JobState.CANCELLED, "cancelled by user", where,
                   {"ended_at": time.time()}, only_from=[JobState.CANCELLING])
    session.commit()


def part_of(session: Session, first: Job, count: int) -> list[Job]:
    """The rows a part tagged with `first` and `count` was submitted for, by rank."""
    if count == 1 or first.launch_id is None:
        return [first]
    rows = session.exec(select(Job).where(
        col(Job.launch_id) == first.launch_id, col(Job.attempt) == first.attempt,
        col(Job.rank) >= first.rank, col(Job.rank) < first.rank + count)
        .order_by(col(Job.rank))).all()
    return list(rows)
