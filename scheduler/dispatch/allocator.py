"""The allocator: atomic GPU reservations in Redis and routing jobs to per-GPU queues.

A dispatch pass walks PENDING jobs by priority (then id, so FIFO within a priority), picks
GPUs on one host, reserves them all-or-nothing with a Lua script, marks the job STARTING,
and sends it to the queue of its first GPU. Only one pass runs at a time (the dispatcher's
turn, two Lua scripts in app/store/cluster.py); a pass requested while another runs sets a
flag so that the running one goes round again. A submission that heads the queue is placed
outside the turn (`place_head`), as any pass would place it first.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
import uuid
from typing import NamedTuple

from sqlalchemy import ColumnElement, Float, Select, bindparam, false, or_, select, update
from sqlmodel import Session, col

from app.core.keys import CPU_QUEUE, gpu_queue
from app.core.signing import run_message
from app.core.states import JobState
from app.runtime import Runtime
from app.store.cluster import (
    HostView,
    enter_dispatch,
    holder,
    inventory_settled,
    next_dispatch,
    read_hosts,
    release,
    reserve,
)
from app.store.jobs import held_gpus, transition
from app.store.models import Job, fixed

log = logging.getLogger(__name__)

DISPATCH_BATCH = 1000  # 0-GPU jobs routed per pass
# How long one pass may hold the dispatcher's turn before another may take it (a holder
# that died): far longer than a pass, which examines a bounded number of jobs.
DISPATCH_TURN_S = 60.0
# PENDING GPU jobs read at a time, until the free GPUs are spoken for: the first page is
# small (most passes place a job or two), each next one twice the last, up to the largest,
# so that passing over a deep run of jobs that cannot start takes a few reads.
SCAN_CHUNK = 64
SCAN_CHUNK_MAX = 512


def _pick(job: Candidate, hosts: list[HostView], earmarked: set[tuple[str, int]]
          ) -> tuple[HostView, list[int]] | None:
    """Best fit: the host with the fewest usable free GPUs that still holds the job."""
    options = []
    for host in hosts:
        usable = [i for i in host.free if (host.name, i) not in earmarked
                  and (job.allowed_gpu_ids is None or i in job.allowed_gpu_ids)]
        if len(usable) >= job.gpus:
            options.append((len(usable), host.name, host, usable[: job.gpus]))
    if not options:
        return None
    _, _, host, gpus = min(options, key=lambda o: (o[0], o[1]))
    return host, gpus


def _allowed(job: Candidate, ids: list[int]) -> list[int]:
    return [i for i in ids if job.allowed_gpu_ids is None or i in job.allowed_gpu_ids]


def _earmark(job: Candidate, hosts: list[HostView], earmarked: set[tuple[str, int]]) -> bool:
    """Set free GPUs aside for a job that cannot start yet, so smaller jobs behind it do
    not take them one by one forever (no starvation of multi-GPU jobs); False, setting
    nothing aside, when no host can hold it even once its gpuq jobs end (GPUs used by
    processes outside gpuq, or whose workers are down): it must not block the jobs
    behind it for as long as that lasts."""
    fitting = [h for h in hosts if len(_allowed(job, h.serving)) >= job.gpus]
    if not fitting:
        return False
    host = max(fitting, key=lambda h: len([i for i in h.free if (h.name, i) not in earmarked]))
    usable = [i for i in _allowed(job, host.free) if (host.name, i) not in earmarked]
    earmarked.update((host.name, i) for i in usable[: job.gpus])
    return True


def never_fits(job: Candidate, hosts: list[HostView]) -> str | None:
    """Why no registered host could ever hold the job, or None."""
    largest = max((h.capacity for h in hosts), default=0)
    if job.gpus > largest:
        return no_resource_reason(job.gpus, largest)
    if job.allowed_gpu_ids is not None and not any(
            len(_allowed(job, h.indices)) >= job.gpus for h in hosts):
        ids = ",".join(map(str, job.allowed_gpu_ids))
        return (f"asks for {job.gpus} of GPUs {ids}; no registered host has "
                f"{job.gpus} of those indices")
    return None


WAITING_REASON = ("waiting: no host has {gpus} GPUs in service now (used by processes "
                  "outside gpuq, or their workers are down)")


def no_resource_reason(gpus: int, largest: int) -> str:
    return f"asks for {gpus} GPUs; the largest registered host has {largest}"


class Candidate(NamedTuple):
    """The few columns of a PENDING job that placing it needs."""

    id: int
    gpus: int
    allowed_gpu_ids: list[int] | None
    attempt: int
    priority: int
    reason: str | None


CandidateQuery = Select[int | None, int, list[int] | None, int, int, str | None]


def candidates(gpu_jobs: bool, *where: ColumnElement[bool]) -> CandidateQuery:
    """PENDING local jobs that wait for no other job, GPU jobs or 0-GPU jobs, highest
    priority first, then oldest: the order of their partial index, read without a sort."""
    query = _candidates(gpu_jobs)
    return query.where(*where) if where else query


@functools.cache
def _candidates(gpu_jobs: bool) -> CandidateQuery:
    """Built once: the time a restart's backoff is held against is read when it runs."""
    gpus = col(Job.gpus) > fixed(0) if gpu_jobs else col(Job.gpus) == fixed(0)
    now = bindparam("now", callable_=time.time, type_=Float)
    return (select(col(Job.id), col(Job.gpus), col(Job.allowed_gpu_ids), col(Job.attempt),
                   col(Job.priority), col(Job.reason))
            .where(col(Job.state) == fixed(JobState.PENDING.value), col(Job.waiting) == false(),
                   col(Job.backend) == fixed("local"), gpus,
                   or_(col(Job.not_before).is_(None), col(Job.not_before) <= now))
            .order_by(col(Job.priority).desc(), col(Job.id)))


class Dispatcher:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._inventory_settled: bool | None = None

    def dispatch(self, max_passes: int | None = None) -> int:
        """Run passes while work keeps arriving; return how many jobs were routed.

        Servers (workers, beat) pass no limit and serve every request that arrives while
        they hold the turn. A client passes a small `max_passes` so that its call returns;
        a request left over stays flagged, and the GPU workers' heartbeat threads, which
        look at the flag twice a second, serve it."""
        r, token = self.rt.redis, uuid.uuid4().hex
        if not enter_dispatch(r, token, DISPATCH_TURN_S):
            return 0
        routed, passes, go_again = 0, 0, True
        try:
            while go_again:
                routed += self._pass()
                passes += 1
                go_again = next_dispatch(r, token, DISPATCH_TURN_S,
                                         max_passes is None or passes < max_passes)
        except BaseException:
            with contextlib.suppress(Exception):
                next_dispatch(r, token, DISPATCH_TURN_S, False)
            raise
        return routed

    def place_head(self) -> int:
        """Start the job at the head of the queue now, without waiting for the dispatcher's
        turn: what any pass would do first, so a submission that heads the queue starts
        while a pass of another caller is still under way. Callers that race for a GPU or
        a job are settled as two passes are: the reservation script gives each GPU to one,
        the move from PENDING each job to one."""
        return self._pass(limit=1, cpu=False)

    def _pass(self, limit: int | None = None, cpu: bool = True) -> int:
        """Route what can start: 0-GPU jobs (`cpu`), then GPU jobs by priority, examining
        at most `limit` of them (GPUQ_DISPATCH_SCAN_LIMIT)."""
        self._inventory_settled = None
        hosts = read_hosts(self.rt.redis)
        with self.rt.session() as session:  # the reads that open a pass: one transaction
            # The database is the truth of who holds which GPU: a hold Redis lost (a restart
            # without persistence, an eviction, an outage past its TTL) is still a hold.
            held = held_gpus(session)
            for host in hosts:
                host.free = [i for i in host.free if (host.name, i) not in held]
            cpu_jobs = [Candidate._make(row) for row in session.connection().execute(
                candidates(False).limit(DISPATCH_BATCH))] if cpu else []
            limit = limit or self.rt.settings.dispatch_scan_limit
            first = (self._pending_gpu_jobs(None, min(SCAN_CHUNK, limit), session)
                     if any(h.free for h in hosts) else [])
        routed = sum(1 for job in cpu_jobs if self._start(job, None, []))
        earmarked: set[tuple[str, int]] = set()

        def usable() -> int:
            return sum(1 for h in hosts for i in h.free if (h.name, i) not in earmarked)

        # Within a pass free GPUs only shrink and earmarks only grow: a shape (GPU count,
        # allowed ids) that found no place and set its GPUs aside finds none later in the
        # pass either, so the jobs of that shape behind it are passed over at once.
        waiting_shapes: set[tuple[int, tuple[int, ...] | None]] = set()
        examined = 0
        after: Candidate | None = None
        size = SCAN_CHUNK
        while usable() > 0 and examined < limit:
            chunk = first if after is None else self._pending_gpu_jobs(
                after, min(size, limit - examined))
            size = min(size * 2, SCAN_CHUNK_MAX)
            if not chunk:
                break
            for job in chunk:
                examined += 1
                routed += self._place(job, hosts, earmarked, waiting_shapes)
                if usable() == 0 or examined >= limit:
                    break
            after = chunk[-1]
        return routed

    def _place(self, job: Candidate, hosts: list[HostView], earmarked: set[tuple[str, int]],
               waiting_shapes: set[tuple[int, tuple[int, ...] | None]]) -> int:
        """Start the job, refuse it, set GPUs aside for it, or say why it waits; 1 if it
        was routed."""
        shape = (job.gpus, tuple(job.allowed_gpu_ids)
                 if job.allowed_gpu_ids is not None else None)
        if shape in waiting_shapes:
            return 0
        # A job is refused as never fitting only by a whole inventory.
        if (why := never_fits(job, hosts)) is not None and hosts and self._settled():
            self._no_resource(job, why)
        elif (choice := _pick(job, hosts, earmarked)) is not None:
            host, gpus = choice
            started = self._start(job, host.name, gpus)
            if started is not False:  # started, or its GPUs taken meanwhile by another
                host.free = [i for i in host.free if i not in gpus]
            return 1 if started else 0
        elif _earmark(job, hosts, earmarked):
            waiting_shapes.add(shape)
        else:
            self._note_waiting(job, WAITING_REASON.format(gpus=job.gpus))
        return 0

    def _settled(self) -> bool:
        """Whether the inventory is whole, read once a pass and only when it matters."""
        if self._inventory_settled is None:
            self._inventory_settled = inventory_settled(self.rt.redis)
        return self._inventory_settled

    def _pending_gpu_jobs(self, after: Candidate | None, size: int,
                          session: Session | None = None) -> list[Candidate]:
        """The next `size` PENDING GPU jobs by priority, then id, after `after`: the rest of
        its priority, then lower priorities; each a seek into the candidate index."""
        with contextlib.ExitStack() as stack:
            if session is None:
                session = stack.enter_context(self.rt.session())

            def read(*where: ColumnElement[bool], limit: int = size) -> list[Candidate]:
                query = candidates(True, *where).limit(limit)
                return [Candidate._make(row) for row in session.connection().execute(query)]

            if after is None:
                return read()
            found = read(col(Job.priority) == after.priority, col(Job.id) > after.id)
            if len(found) < size:
                found += read(col(Job.priority) < after.priority, limit=size - len(found))
            return found

    def _no_resource(self, job: Candidate, why: str) -> None:
        with self.rt.session() as session:
            transition(session, JobState.FAILED_NO_RESOURCE, why, [col(Job.id) == job.id],
                       only_from=[JobState.PENDING])

    def _note_waiting(self, job: Candidate, why: str) -> None:
        """Say why a job that cannot start now waits (once, not on every pass)."""
        if job.reason == why:
            return
        with self.rt.session() as session:
            session.execute(update(Job).where(
                col(Job.id) == job.id, col(Job.state) == JobState.PENDING.value,
                col(Job.attempt) == job.attempt).values(reason=why))

    def _start(self, job: Candidate, host: str | None, gpus: list[int]) -> bool | None:
        """True when the job was routed; False when it moved on meanwhile (cancelled,
        started by another), its GPUs given back; None when its GPUs were taken meanwhile."""
        r, ttl = self.rt.redis, self.rt.settings.reservation_ttl_s
        attempt = job.attempt + 1
        token = holder(job.id, attempt)
        if host is not None and not reserve(r, host, gpus, token, ttl):
            return None
        try:
            moved = self._mark_starting(job, host, gpus, attempt)
        except BaseException:  # the database refused: the reservation must not outlive it
            if host is not None:
                release(r, host, gpus, token)
            raise
        if not moved:  # cancelled, or started by another, meanwhile
            if host is not None:
                release(r, host, gpus, token)
            return False
        queue = gpu_queue(host, gpus[0]) if host is not None else CPU_QUEUE
        # Nobody waits on this message's result: without ignore_result, Celery subscribes
        # to a result channel per message sent, and a long-lived dispatcher keeps them all.
        message = run_message(self.rt.settings.secret, job.id, attempt)
        self.rt.celery.send_task("gpuq.run", args=message, queue=queue, ignore_result=True)
        log.debug("job %s -> %s %s", job.id, queue, json.dumps(gpus))
        return True

    def _mark_starting(self, job: Candidate, host: str | None, gpus: list[int],
                       attempt: int) -> bool:
        ttl = self.rt.settings.reservation_ttl_s
        with self.rt.session() as session:
            return bool(transition(
                session, JobState.STARTING, None, [col(Job.id) == job.id],
                {"host": host, "gpu_ids": gpus, "attempt": attempt, "dispatched_at": time.time(),
                 "lease_until": time.time() + ttl, "pid": None, "pid_identity": None},
                only_from=[JobState.PENDING]))
