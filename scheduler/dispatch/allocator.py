"""The allocator: atomic GPU reservations in Redis and routing jobs to per-GPU queues.

A dispatch pass walks PENDING jobs by priority (then id, so FIFO within a priority), picks
GPUs on one host (the planner, scheduler/planner/: fit, order, reservations and backfill),
reserves them all-or-nothing with a Lua script, marks the job STARTING, and sends it to the
queue of its first GPU. Only one pass runs at a time (the dispatcher's
turn, two Lua scripts in app/store/cluster.py); a pass requested while another runs sets a
flag so that the running one goes round again. A submission that heads the queue is placed
outside the turn (`place_head`), as any pass would place it first.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from enum import Enum
from typing import NamedTuple

from sqlalchemy import ColumnElement, or_, select, update
from sqlmodel import Session, col

from app.core.keys import CPU_QUEUE, RESERVATIONS, gpu_queue
from app.core.signing import run_message
from app.core.states import EtaBasis, JobState
from app.runtime import Runtime
from app.store import histograms, limits
from app.store.caps import CPU_JOBS, Cap, caps_of, within
from app.store.cluster import (
    HostView,
    cpu_slots,
    enter_dispatch,
    holder,
    inventory_settled,
    next_dispatch,
    read_hosts,
    release,
    reserve,
)
from app.store.jobs import (
    batch_holding,
    cpu_slot_holders,
    held_gpus,
    holding,
    transition,
)
from app.store.models import Job
from scheduler.planner import reservations
from scheduler.planner.candidates import Candidate, candidates, level_heads
from scheduler.planner.fit import CAPPED_REASON, WAITING_REASON, allowed, never_fits, pick
from scheduler.planner.order import Shares
from scheduler.planner.reservations import Book, Reservation

log = logging.getLogger(__name__)

DISPATCH_BATCH = 1000  # 0-GPU jobs routed per pass, at most
CPU_WINDOW = 64  # 0-GPU candidates read at least, for fair share among them
# How long one pass may hold the dispatcher's turn before another may take it (a holder
# that died): far longer than a pass, which examines a bounded number of jobs.
DISPATCH_TURN_S = 60.0
# PENDING GPU jobs read at a time, until the free GPUs are spoken for: the first page is
# small (most passes place a job or two), each next one twice the last, up to the largest,
# so that passing over a deep run of jobs that cannot start takes a few reads.
SCAN_CHUNK = 64
SCAN_CHUNK_MAX = 512
# The first read of each group's candidates when several groups have some: a pass places a
# job or two, so most groups' heads are all it looks at.
GROUP_CHUNK = 4


class CpuPlan(NamedTuple):
    """What one pass read to route 0-GPU jobs."""

    window: list[Candidate]
    free: int
    running: Counter[tuple[str, str]]  # 0-GPU jobs held per (user|project, name)
    limits: limits.Limits


class Start(Enum):
    """How an attempt to start a job ended."""

    ROUTED = "routed"  # placed and its run message sent
    GONE = "gone"  # it left PENDING meanwhile (cancelled, or placed by another caller)
    TAKEN = "taken"  # its GPUs were reserved by another caller meanwhile
    CAPPED = "capped"  # placing it would have put its user or project over a limit


class Cursor:
    """One (owner, project) group's candidates of one priority, oldest first from its head,
    read a page at a time."""

    def __init__(self, dispatcher: Dispatcher, head: Candidate, page: int) -> None:
        self.dispatcher = dispatcher
        self.where = [col(Job.priority) == head.priority, col(Job.owner) == head.owner,
                      col(Job.project) == head.project]
        self.size = page // 2
        self.buffer = [head]
        self.done = False
        self.last: Candidate | None = None

    def head(self, room: int) -> Candidate | None:
        """The group's next job, reading at most `room` more (what the pass may examine)."""
        if not self.buffer and not self.done and self.last is not None and room > 0:
            self.size = min(self.size * 2, SCAN_CHUNK_MAX, room)
            self.buffer = self.dispatcher._pending_gpu_jobs(self.last, self.size, self.where)
            self.done = len(self.buffer) < self.size
        return self.buffer[0] if self.buffer else None

    def pop(self) -> Candidate:
        self.last = self.buffer.pop(0)
        return self.last


# The shapes the pass passes over, (GPU count, allowed ids): each with the shortest limit
# a job of it that found no place had (inf: none); a job as long or longer finds none.
Shapes = dict[tuple[int, tuple[int, ...] | None], float]


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
                began = time.perf_counter()
                routed += self._pass()
                histograms.observe(r, histograms.DISPATCH_PASS, time.perf_counter() - began)
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
        """Route what can start: 0-GPU jobs (`cpu`), then GPU jobs, examining at most
        `limit` of them (GPUQ_DISPATCH_SCAN_LIMIT): by priority, then, within a priority,
        the user (or project) with the least fair-share usage per weight first, then the
        oldest; a group over its GPU limit waits. A job that cannot start gets a
        reservation, and those behind it start only where they delay none (backfill). Only
        a full pass (no `limit`) keeps its reservations for the next: `place_head` runs
        beside the turn's holder."""
        keep = limit is None
        self._inventory_settled = None
        self.hosts = hosts = read_hosts(self.rt.redis)
        limit = limit or self.rt.settings.dispatch_scan_limit
        with self.rt.session() as session:  # the reads that open a pass: one transaction
            # The database is the truth of who holds which GPU: a hold Redis lost (a restart
            # without persistence, an eviction, an outage past its TTL) is still a hold.
            self.held = holding(session)
            held = held_gpus(self.held)
            for host in hosts:
                host.free = [i for i in host.free if (host.name, i) not in held]
            cpu_plan = self._cpu_window(session) if cpu else None
            heads: list[Candidate] = []
            wanted = self._wanted(hosts)
            if wanted:
                self.shares = Shares(session, self.rt.settings,
                                     self.held + batch_holding(session))
                heads = level_heads(session, None)
            self.book = self._book(session)
        routed = self._start_cpu_jobs(cpu_plan) if cpu_plan is not None else 0
        book = self.book

        def usable() -> int:
            return sum(len(h.free) for h in hosts) - book.set_aside(hosts)

        # Within a pass free GPUs only shrink and reservations only grow: a shape (GPU
        # count, allowed ids) that found no place for a limit finds none later in the pass
        # for that limit or a longer one, so those jobs are passed over at once (and reserve
        # nothing: the first of a shape holds the reservation).
        waiting_shapes: Shapes = {}
        blocked: set[tuple[str, str]] = set()  # groups over a limit wait for the pass
        examined = 0
        while heads and examined < limit and self._going(usable):
            level = heads[0].priority
            heads = [h for h in heads if (h.owner, h.project) not in blocked]
            page = min(SCAN_CHUNK, limit) if len(heads) == 1 else GROUP_CHUNK
            examined, placed = self._level([Cursor(self, h, page) for h in heads], examined,
                                           limit, usable, waiting_shapes, blocked)
            routed += placed
            if examined < limit and self._going(usable):
                with self.rt.session() as session:
                    heads = level_heads(session, level)
        if keep and wanted:
            self._keep(book)
        return routed

    def clock(self) -> float:
        """Now, as reservations count it (a simulation sets its own)."""
        return time.time()

    def _book(self, session: Session) -> Book:
        """The pass's reservations: those earlier passes kept for jobs still PENDING."""
        carried = reservations.loads(self.rt.redis.get(RESERVATIONS))  # type: ignore[arg-type]
        if carried:
            pending = set(session.connection().execute(select(col(Job.id)).where(
                col(Job.id).in_(list(carried)),
                col(Job.state) == JobState.PENDING.value)).scalars())
            carried = {k: r for k, r in carried.items() if k in pending}
        now = self.clock()
        return Book(now, self.rt.settings.backfill_reserve_depth,
                    reservations.held_until(self.held, now), carried)

    def _keep(self, book: Book) -> None:
        """Keep the pass's reservations for the next pass."""
        self.rt.redis.set(RESERVATIONS, reservations.dumps(book.kept()))

    def _level(self, cursors: list[Cursor], examined: int, limit: int,
               usable: Callable[[], int], waiting_shapes: Shapes,
               blocked: set[tuple[str, str]]) -> tuple[int, int]:
        """Place the jobs of one priority: the group with the least fair-share usage per
        weight first, each group's oldest first; return (examined, routed)."""
        shares, routed = self.shares, 0
        order = [(shares.key(c.buffer[0]), c.buffer[0].id, n) for n, c in enumerate(cursors)]
        heapq.heapify(order)
        while order and examined < limit and self._going(usable):
            key, job_id, n = heapq.heappop(order)
            cursor = cursors[n]
            job = cursor.head(0)
            assert job is not None and job.id == job_id
            # Usage only grows within a pass: a group whose usage grew since it was queued
            # goes back at its new place.
            if (fresh := shares.key(job)) > key:
                heapq.heappush(order, (fresh, job_id, n))
                continue
            cursor.pop()
            examined += 1
            if (why := shares.over_limit(job)) is not None:
                blocked.add((job.owner, job.project))
                self.book.passed(job)
                self._over_limit(job, why)
                continue  # the group waits: its later jobs do not pass its head
            started = self._place(job, self.hosts, self.book, waiting_shapes)
            if started is Start.CAPPED:  # another caller's placement reached the limit first
                blocked.add((job.owner, job.project))
                self.book.passed(job)
                self._over_limit(job, shares.over_limit(job) or CAPPED_REASON)
                continue
            # A job another caller placed holds its GPUs as surely as one this pass placed.
            if started in (Start.ROUTED, Start.GONE):
                shares.started(job)
            routed += started is Start.ROUTED
            if (following := cursor.head(limit - examined)) is not None:
                heapq.heappush(order, (shares.key(following), following.id, n))
        return examined, routed

    def _cpu_window(self, session: Session) -> CpuPlan | None:
        """What routing 0-GPU jobs needs, or None when no CPU slot is free: slots that live
        CPU workers offer and no job holds (a start message is never queued for a slot
        that is not there), the first candidates by priority and age, a few times as many
        as the slots free, and who holds the slots now."""
        holders = cpu_slot_holders(session)
        free = cpu_slots(self.rt.redis) - len(holders)
        if free <= 0:
            return None
        window = [Candidate._make(row) for row in session.connection().execute(
            candidates(False).limit(min(DISPATCH_BATCH, max(CPU_WINDOW, 8 * free))))]
        running: Counter[tuple[str, str]] = Counter()
        for owner, project in holders:
            running[("user", owner)] += 1
            running[("project", project)] += 1
        return CpuPlan(window, free, running, limits.read(session, self.rt.settings,
                                                           strict=False))

    def _start_cpu_jobs(self, plan: CpuPlan) -> int:
        """Route 0-GPU jobs into the free slots: highest priority first, then the user (or
        project) running the fewest per unit of weight (fair share), then the oldest; a
        user or project at its max_cpu_jobs waits, checked again where each start is
        written. How many were routed."""
        settings, routed, free = self.rt.settings, 0, plan.free
        window, running, found = list(plan.window), plan.running, plan.limits

        def share(job: Candidate) -> float:
            who = (settings.fair_share_by,
                   job.owner if settings.fair_share_by == "user" else job.project)
            return running[who] / found.weight(*who) if settings.fair_share else 0.0

        while window and free > 0:
            job = min(window, key=lambda j: (-j.priority, share(j), j.id))
            window.remove(job)
            caps = caps_of(found, job.owner, job.project, CPU_JOBS)
            full = next((c for c in caps if running[(c.kind, c.name)] >= c.most), None)
            started = self._start(job, None, [], caps) if full is None else Start.CAPPED
            if started in (Start.ROUTED, Start.GONE):
                running[("user", job.owner)] += 1
                running[("project", job.project)] += 1
            if started is Start.ROUTED:
                routed, free = routed + 1, free - 1
            elif started is Start.CAPPED:
                cap = full or caps[0]
                self._note_waiting(job, f"over a limit: {cap.kind} {cap.name} runs "
                                        f"{running[(cap.kind, cap.name)]}/{cap.most} 0-GPU "
                                        "jobs (max_cpu_jobs)")
        return routed

    def _wanted(self, hosts: list[HostView]) -> bool:
        """Whether GPU jobs are worth reading this pass: some GPU is free."""
        return any(h.free for h in hosts)

    def _going(self, usable: Callable[[], int]) -> bool:
        """Whether the pass goes on to the next job: while a GPU is left to give."""
        return usable() > 0

    def _over_limit(self, job: Candidate, why: str) -> None:
        self._note_waiting(job, why)

    def _place(self, job: Candidate, hosts: list[HostView], book: Book,
               waiting_shapes: Shapes) -> Start | None:
        """Start the job (where it delays no reservation), refuse it, reserve GPUs for it,
        or say why it waits; how its start went, or None when it was not tried."""
        shape = (job.gpus, tuple(job.allowed_gpu_ids)
                 if job.allowed_gpu_ids is not None else None)
        length = math.inf if job.time_limit_s is None else job.time_limit_s
        shortest = waiting_shapes.get(shape)
        if shortest is not None and length >= shortest and not book.holds(job):
            return None
        # A job is refused as never fitting only by a whole inventory.
        if (why := never_fits(job, hosts)) is not None and hosts and self._settled():
            book.passed(job)
            self._no_resource(job, why)
        elif (choice := pick(job, hosts, book.closed(job))) is not None:
            host, gpus = choice
            started = self._start(job, host.name, gpus, self.shares.caps(job))
            if started in (Start.ROUTED, Start.TAKEN):  # its GPUs are someone's now
                host.free = [i for i in host.free if i not in gpus]
            if started is Start.ROUTED:
                book.started(job, host.name, gpus)
            elif started is Start.GONE:
                book.passed(job)
            return started
        elif not any(len(allowed(job, h.serving)) >= job.gpus for h in hosts):
            self._note_waiting(job, WAITING_REASON.format(gpus=job.gpus))
        else:  # it waits for GPUs to free: reserved, or past the reservation depth
            waiting_shapes[shape] = min(length, waiting_shapes.get(shape, math.inf))
            if (made := book.reserve(job, hosts)) is not None:
                self._reserved(job, made)
        return None

    def _reserved(self, job: Candidate, made: Reservation) -> None:
        """A reservation was made or kept for the job: its expected start is the
        reservation's (unknown where a job on its GPUs has no limit), written when it
        changed."""
        basis = EtaBasis.RESERVATION if made.start is not None else EtaBasis.UNKNOWN
        if (job.eta, job.eta_basis) == (made.start, basis.value):
            return
        with self.rt.session() as session:
            session.execute(update(Job).where(
                col(Job.id) == job.id, col(Job.state) == JobState.PENDING.value,
                col(Job.attempt) == job.attempt).values(eta=made.start, eta_basis=basis.value))

    def _settled(self) -> bool:
        """Whether the inventory is whole, read once a pass and only when it matters."""
        if self._inventory_settled is None:
            self._inventory_settled = inventory_settled(self.rt.redis)
        return self._inventory_settled

    def _pending_gpu_jobs(self, after: Candidate, size: int,
                          group: Sequence[ColumnElement[bool]]) -> list[Candidate]:
        """The next `size` jobs of a group (`group`: its priority, owner and project) after
        `after`, oldest first: one seek into the candidate index."""
        with self.rt.session() as session:
            query = candidates(True, *group, col(Job.id) > after.id).limit(size)
            return [Candidate._make(row) for row in session.connection().execute(query)]

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

    def _start(self, job: Candidate, host: str | None, gpus: list[int],
               caps: Sequence[Cap] = ()) -> Start:
        """Reserve the job's GPUs, move it to STARTING within `caps` and send its run
        message; what came of it (GPUs given back unless ROUTED)."""
        r, ttl = self.rt.redis, self.rt.settings.reservation_ttl_s
        attempt = job.attempt + 1
        token = holder(job.id, attempt)
        if host is not None and not reserve(r, host, gpus, token, ttl):
            return Start.TAKEN
        try:
            moved = self._mark_starting(job, host, gpus, caps)
        except BaseException:  # the database refused: the reservation must not outlive it
            if host is not None:
                release(r, host, gpus, token)
            raise
        if moved is not Start.ROUTED:
            if host is not None:
                release(r, host, gpus, token)
            return moved
        queue = gpu_queue(host, gpus[0]) if host is not None else CPU_QUEUE
        # Nobody waits on this message's result: without ignore_result, Celery subscribes
        # to a result channel per message sent, and a long-lived dispatcher keeps them all.
        message = run_message(self.rt.settings.secret, job.id, attempt)
        self.rt.celery.send_task("gpuq.run", args=message, queue=queue, ignore_result=True)
        if job.attempt == 0:  # a first start: how long it queued
            histograms.observe(r, histograms.QUEUE_WAIT, time.time() - job.submitted_at)
        log.debug("job %s -> %s %s", job.id, queue, json.dumps(gpus))
        return Start.ROUTED

    def _mark_starting(self, job: Candidate, host: str | None, gpus: list[int],
                       caps: Sequence[Cap]) -> Start:
        """Move the job to STARTING at its next attempt, in one UPDATE fenced on what the
        pass read (still PENDING, at the attempt read, past its backoff) and on its caps.
        ROUTED when it moved; else GONE when it left PENDING or started another attempt
        meanwhile, CAPPED when a cap refused it."""
        ttl, now = self.rt.settings.reservation_ttl_s, time.time()
        with self.rt.session() as session:
            fence = [col(Job.id) == job.id, col(Job.attempt) == job.attempt,
                     or_(col(Job.not_before).is_(None), col(Job.not_before) <= now),
                     *within(session, caps, job.gpus or 1)]
            if transition(
                    session, JobState.STARTING, None, fence,
                    {"host": host, "gpu_ids": gpus, "attempt": job.attempt + 1,
                     "dispatched_at": now, "lease_until": now + ttl, "pid": None,
                     "pid_identity": None, "eta": None, "eta_basis": None},
                    only_from=[JobState.PENDING]):
                return Start.ROUTED
            if not caps:
                return Start.GONE
            # Refused: by a cap only if the job still waits as the pass read it.
            still = session.connection().execute(select(col(Job.id)).where(
                col(Job.id) == job.id, col(Job.state) == JobState.PENDING.value,
                col(Job.attempt) == job.attempt)).first()
            return Start.CAPPED if still is not None else Start.GONE
