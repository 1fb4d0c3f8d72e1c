"""The order of a planning pass within a priority, and the GPU limits it keeps: fair share
(decayed usage per unit of weight) and what each user and project runs."""

from __future__ import annotations

import functools
import time
from collections import Counter

from sqlmodel import Session

from app.core.settings import Settings
from app.store import accounting, limits
from app.store.caps import GPUS, Cap, caps_of
from app.store.jobs import Holding
from scheduler.planner.candidates import Candidate


class Shares:
    """What one pass knows of who holds what: the GPUs each user and project runs (their
    limits), and each one's fair-share usage: decayed GPU-seconds of ended attempts, plus
    each running attempt's GPUs times its time so far, at least GPUQ_FAIR_SHARE_MIN_CHARGE_S
    (so that a job placed in this pass counts at once)."""

    def __init__(self, session: Session, settings: Settings, held: list[Holding]) -> None:
        now = time.time()
        self.limits = limits.read(session, settings, strict=False)
        # Read for every job a pass examines, of a few users and projects: once each.
        self._of = functools.cache(self.limits.of)
        self._weight = functools.cache(self.limits.weight)
        self.by = settings.fair_share_by
        self.enabled = settings.fair_share
        self.min_charge = settings.fair_share_min_charge_s
        self.running: Counter[tuple[str, str]] = Counter()
        self.used: dict[tuple[str, str], float] = (
            accounting.decayed_usage(session, now) if self.enabled else {})
        for row in held:
            ran = now - row.started_at if row.started_at is not None else 0.0
            self._add(row.owner, row.project, row.gpus, row.gpus * max(ran, self.min_charge))

    def _add(self, owner: str, project: str, gpus: int, charge: float) -> None:
        for key in (("user", owner), ("project", project)):
            self.running[key] += gpus
            if self.enabled:
                self.used[key] = self.used.get(key, 0.0) + charge

    def entity(self, job: Candidate) -> tuple[str, str]:
        """Whom fair share compares for this job."""
        return (self.by, job.owner if self.by == "user" else job.project)

    def key(self, job: Candidate) -> float:
        """Its place among jobs of its priority: usage per unit of weight (0 with fair share
        off, leaving the oldest first)."""
        if not self.enabled:
            return 0.0
        entity = self.entity(job)
        return self.used.get(entity, 0.0) / self._weight(*entity)

    def over_limit(self, job: Candidate) -> str | None:
        """Why starting the job would put its user or project over its GPU limit, or None."""
        for kind, name in (("user", job.owner), ("project", job.project)):
            most = self._of(kind, name).max_gpus
            runs = self.running[(kind, name)]
            if most is not None and runs + job.gpus > most:
                return (f"over a limit: {kind} {name} runs {runs}/{most} GPUs (max_gpus) and "
                        f"this job asks for {job.gpus}")
        return None

    def caps(self, job: Candidate) -> list[Cap]:
        """The limits its placement must stay within, checked where it is written."""
        return caps_of(self.limits, job.owner, job.project, GPUS)

    def started(self, job: Candidate) -> None:
        self._add(job.owner, job.project, job.gpus, job.gpus * self.min_charge)
