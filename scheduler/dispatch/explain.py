"""Why a job is PENDING: a code and a sentence, from a dispatch pass that changes nothing.

The explainer runs the dispatcher's own pass over the cluster as it is (the same hosts,
holds, limits, fair-share order and earmarks) but reserves, routes and writes nothing, and
goes on past the point where a real pass stops for want of GPUs, until it reaches the jobs
asked about or the pass's scan limit. What it would do with each of them, and what stood
ahead of it, is the reason. Reasons that need no pass (a dependency, a restart's backoff,
a batch backend) are read from the job itself.

A reason is told to a viewer: jobs the viewer may not see (app.core.identity.sees) are
counted as "jobs of other users", never named by id or owner.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sqlmodel import col, select

from app.core.identity import Actor, sees, sees_everyone
from app.core.states import JobState
from app.runtime import Runtime
from app.store.caps import Cap
from app.store.cluster import HostView
from app.store.models import Job, JobDependency
from scheduler.dispatch.allocator import Dispatcher, Shapes, Start
from scheduler.planner.candidates import Candidate
from scheduler.planner.fit import WAITING_REASON, never_fits, pick
from scheduler.planner.reservations import Book, Reservation


@dataclass(frozen=True)
class Reason:
    code: str
    text: str

    def dump(self) -> dict[str, str]:
        return {"code": self.code, "reason": self.text}


# Every code `why` answers with, and what it means.
CODES = {
    "READY": "GPUs are free for it: the next dispatch pass starts it",
    "NOT_PENDING": "it is not waiting (it runs, or it ended)",
    "DEPENDENCY": "waiting for jobs it runs after (--after)",
    "BACKOFF": "a restart waiting out its backoff",
    "BATCH": "queued at a batch backend, which decides when it starts",
    "CPU": "a 0-GPU job waiting for a CPU slot",
    "LIMIT": "its user or project runs as many GPUs as its limit allows",
    "FAIR_SHARE": "jobs of another user (or project) that used less go first",
    "PRIORITY": "jobs of higher priority go first",
    "EARMARKED": "the GPUs it could use are set aside for a larger job ahead of it",
    "RESOURCES": "the GPUs it may use run other gpuq jobs",
    "FOREIGN": "the GPUs it may use are busy with processes outside gpuq",
    "WORKER_DOWN": "the worker of a GPU it needs is down",
    "NEVER_FITS": "no registered host can ever hold it",
    "DEPTH": "deeper in the queue than one dispatch pass looks",
}


def _ids(ids: Iterable[int]) -> str:
    return ", ".join(map(str, ids))


def _jobs(n: int) -> str:
    return f"{n} job{'s' if n != 1 else ''}"


def _named(viewer: Actor | None, jobs: Sequence[tuple[int, str]], prefix: str = "",
           limit: int = 10) -> str:
    """Jobs (id, owner) as the viewer may be told of them: the ids of those they see (after
    `prefix`), and how many of other users' there are."""
    shown = [i for i, owner in jobs if sees(viewer, owner)]
    others = len(jobs) - len(shown)
    parts = ([prefix + _ids(shown[:limit])] if shown else []) + (
        [f"{_jobs(others)} of other users"] if others else [])
    return "; ".join(parts)


class Explainer(Dispatcher):
    """A pass that changes nothing and says what it would do with the jobs asked about."""

    def __init__(self, rt: Runtime, targets: dict[int, tuple[str, str]],
                 viewer: Actor | None = None) -> None:
        super().__init__(rt)
        self.targets = targets
        self.viewer = viewer
        self.reasons: dict[int, Reason] = {}
        self.ahead: list[Candidate] = []
        self.blocked: dict[tuple[str, str], str] = {}

    def explain(self) -> dict[int, Reason]:
        self._pass(cpu=False)
        for job_id in self.targets.keys() - self.reasons.keys():
            self.reasons[job_id] = self._unreached(job_id)
        return self.reasons

    # -- the pass's hooks: reserve, route and write nothing, and look until the targets --

    def _wanted(self, hosts: list[HostView]) -> bool:
        return True

    def _going(self, usable: Callable[[], int]) -> bool:
        return bool(self.targets.keys() - self.reasons.keys())

    def _start(self, job: Candidate, host: str | None, gpus: list[int],
               caps: Sequence[Cap] = ()) -> Start:
        return Start.ROUTED

    def _no_resource(self, job: Candidate, why: str) -> None:
        pass

    def _note_waiting(self, job: Candidate, why: str) -> None:
        pass

    def _over_limit(self, job: Candidate, why: str) -> None:
        self.blocked[(job.owner, job.project)] = why
        if job.id in self.targets:
            self.reasons[job.id] = Reason("LIMIT", why)
        self.ahead.append(job)

    def _place(self, job: Candidate, hosts: list[HostView], book: Book,
               waiting_shapes: Shapes) -> Start | None:
        if job.id in self.targets:
            self.reasons[job.id] = self._decide(job, hosts, book)
        placed = super()._place(job, hosts, book, waiting_shapes)
        self.ahead.append(job)
        return placed

    def _reserved(self, job: Candidate, made: Reservation) -> None:
        """A job given a reservation with a start says so after why it waits."""
        found = self.reasons.get(job.id)
        if found is not None and made.start is not None:
            self.reasons[job.id] = Reason(found.code, f"{found.text}; {self._reservation(made)}")

    def _keep(self, book: Book) -> None:
        pass

    # -- the reasons -------------------------------------------------------------------

    def _decide(self, job: Candidate, hosts: list[HostView], book: Book) -> Reason:
        if (why := never_fits(job, hosts)) is not None and hosts and self._settled():
            return Reason("NEVER_FITS", why)
        if pick(job, hosts, book.closed(job)) is not None:
            return Reason("READY", CODES["READY"])
        return self._diagnose(job, hosts, book)

    def _reservation(self, made: Reservation) -> str:
        """"reserved GPUs 0,1 on host h from 14:05 (job 812 ends by then)"."""
        assert made.start is not None
        gpus = ",".join(map(str, made.gpus))
        on = {(h.host, i): h for h in self.held if h.host for i in h.gpu_ids or []}
        holders = {h.id: h for i in made.gpus if (h := on.get((made.host, i))) is not None}
        at = time.strftime("%H:%M", time.localtime(made.start))
        last = [(h.id, h.owner) for h in holders.values() if h.time_limit_s is not None
                and (h.started_at or made.start) + h.time_limit_s >= made.start - 1]
        ends = _named(self.viewer, last, prefix="job ")
        return (f"reserved GPUs {gpus} on host {made.host} from {at}"
                + (f" ({ends} ends by then)" if ends else ""))

    def _diagnose(self, job: Candidate, hosts: list[HostView], book: Book) -> Reason:
        def allowed(ids: list[int]) -> list[int]:
            return [i for i in ids if job.allowed_gpu_ids is None or i in job.allowed_gpu_ids]

        serving = [h for h in hosts if len(allowed(h.serving)) >= job.gpus]
        if not serving:
            return _unserved(job, hosts, allowed)
        for h in serving:
            marks = sorted({r.job_id for i in allowed(h.free)
                            if (r := book.holder(h.name, i)) is not None and r.job_id != job.id})
            if marks and len(allowed(h.free)) >= job.gpus:
                return Reason("EARMARKED", f"GPUs it could use on host {h.name} are set aside "
                              f"for {self._one(marks[0])}, ahead of it, which needs more "
                              "at once")
        higher = [c for c in self.ahead if c.priority > job.priority]
        if higher:
            return Reason("PRIORITY", self._behind(higher, "of higher priority"))
        shares = self.shares
        mine = shares.entity(job)
        passed = [c for c in self.ahead if c.priority == job.priority and c.id > job.id
                  and shares.entity(c) != mine]
        if passed and shares.enabled:
            return self._fair_share(job, passed[0])
        held = {(h.host, i): (h.id, h.owner) for h in self.held if h.host
                for i in h.gpu_ids or []}
        busy = sorted({held[(h.name, i)] for h in serving for i in allowed(h.serving)
                       if (h.name, i) in held})
        queued = len(self.ahead)
        running = _named(self.viewer, busy, prefix="gpuq jobs ") or "gpuq jobs (starting)"
        return Reason("RESOURCES", f"waiting for GPUs: those it may use run {running}"
                      + (f"; {_jobs(queued)} go first" if queued else ""))

    def _one(self, job_id: int) -> str:
        """A job ahead, by id if the viewer sees it."""
        owner = next((c.owner for c in self.ahead if c.id == job_id), "")
        return f"job {job_id}" if sees(self.viewer, owner) else "a job of another user"

    def _behind(self, ahead: list[Candidate], what: str) -> str:
        """"behind N jobs `what` (first: job X)" to whoever sees them all; to another
        viewer, how many are other users' and which are their own."""
        if sees_everyone(self.viewer):
            return f"behind {_jobs(len(ahead))} {what} (first: job {ahead[0].id})"
        own = [c.id for c in ahead if sees(self.viewer, c.owner)]
        others = len(ahead) - len(own)
        parts = ([f"{_jobs(others)} of other users"] if others else []) + (
            [f"{len(own)} of yours (first: job {own[0]})"] if own else [])
        return f"behind {' and '.join(parts)}, {what}"

    def _fair_share(self, job: Candidate, first: Candidate) -> Reason:
        kind, name = self.shares.entity(first)
        _, own = self.shares.entity(job)
        if not sees_everyone(self.viewer):
            kind, name = "jobs of", f"another {kind}"
        return Reason("FAIR_SHARE", f"behind {kind} {name} in fair share: {name} has used "
                      f"{self._hours(first)} GPU-hours per unit of weight, "
                      f"{own} {self._hours(job)}")

    def _hours(self, job: Candidate) -> str:
        return f"{self.shares.key(job) / 3600:.2f}"

    def _unreached(self, job_id: int) -> Reason:
        """A job the pass did not reach: its group waits on a limit, or it is deeper."""
        if (why := self.blocked.get(self.targets[job_id])) is not None:
            return Reason("LIMIT", why)
        depth = self.rt.settings.dispatch_scan_limit
        return Reason("DEPTH", f"more than {depth:,} jobs go first; a dispatch pass looks at "
                      f"{depth:,} (GPUQ_DISPATCH_SCAN_LIMIT), so it waits for those ahead")


def _unserved(job: Candidate, hosts: list[HostView],
              allowed: Callable[[list[int]], list[int]]) -> Reason:
    """Why no host serves enough of the GPUs a job may use: others use them, or their
    workers are down."""
    for h in hosts:
        if allowed(h.foreign) and len(allowed(h.serving + h.foreign)) >= job.gpus:
            return Reason("FOREIGN", f"the GPUs it may use are busy with processes outside "
                          f"gpuq on host {h.name} ({_ids(allowed(h.foreign))})")
    for h in hosts:
        if allowed(h.down) and len(allowed(h.indices)) >= job.gpus:
            down = allowed(h.down)
            return Reason("WORKER_DOWN", f"the worker{'s' if len(down) > 1 else ''} of GPU "
                          f"{_ids(down)} on host {h.name}, which it needs, "
                          f"{'are' if len(down) > 1 else 'is'} down (no heartbeat)")
    return Reason("RESOURCES", WAITING_REASON.format(gpus=job.gpus))


def explain(rt: Runtime, jobs: list[Job], viewer: Actor | None = None) -> dict[int, Reason]:
    """Why each of these jobs waits (jobs that are not PENDING say what they are), told
    to `viewer` (None: the stack's owner)."""
    reasons: dict[int, Reason] = {}
    targets: dict[int, tuple[str, str]] = {}  # id: (owner, project)
    now = time.time()
    waiting = [j.id for j in jobs if j.state == JobState.PENDING.value and j.waiting and j.id]
    after = _unfinished_after(rt, waiting)
    for job in jobs:
        assert job.id is not None
        if job.state != JobState.PENDING.value:
            where = f" on {job.host} (GPUs {_ids(job.gpu_ids or [])})" if job.host else ""
            reasons[job.id] = Reason("NOT_PENDING", f"it is {job.state}{where}")
        elif job.backend != "local":
            reasons[job.id] = Reason("BATCH", f"queued at the {job.backend} backend"
                                     + (f": {job.reason}" if job.reason else ""))
        elif job.waiting:
            waited = _named(viewer, after.get(job.id, []), prefix="job ")
            reasons[job.id] = Reason("DEPENDENCY", f"waiting for {waited} to SUCCEED "
                                     "(--after)")
        elif job.not_before is not None and job.not_before > now:
            reasons[job.id] = Reason("BACKOFF", "restarting: it may start again in "
                                     f"{job.not_before - now:.0f} s (restart backoff)")
        elif job.gpus == 0:
            reasons[job.id] = Reason("CPU", "waiting for a CPU slot (GPUQ_CPU_SLOTS 0-GPU jobs "
                                     "run at once)")
        else:
            targets[job.id] = (job.owner, job.project)
    if targets:
        reasons.update(Explainer(rt, targets, viewer).explain())
    return reasons


def _unfinished_after(rt: Runtime, job_ids: list[int]) -> dict[int, list[tuple[int, str]]]:
    """The unfinished jobs each of these runs after: (id, owner), by id."""
    if not job_ids:
        return {}
    found: dict[int, list[tuple[int, str]]] = {}
    with rt.session() as session:
        rows = session.exec(
            select(JobDependency.job_id, JobDependency.after_id, Job.owner)
            .join(Job, col(Job.id) == col(JobDependency.after_id))
            .where(col(JobDependency.job_id).in_(job_ids),
                   col(Job.state) != JobState.SUCCEEDED.value)
            .order_by(col(JobDependency.after_id)))
        for job_id, after_id, owner in rows:
            found.setdefault(job_id, []).append((after_id, owner))
    return found
