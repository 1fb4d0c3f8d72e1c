"""Reservations and the backfill rule.

A job at the head that cannot start now gets a reservation: the GPUs (one host, indices)
it will take and the earliest time it can start, the time the last of them frees by the
time limits of the jobs that hold them (started_at + time_limit_s). Reservations are made
in the pass's order, for the first GPUQ_BACKFILL_RESERVE_DEPTH blocked jobs (at least one);
each later one plans around those before it.

Any other job may take a reserved GPU now only if it delays no reservation: its own limit
ends by the reservation's start. A job without a limit never does. A GPU held by a running
job without a limit makes the start unknown: the reserved GPUs are then set aside outright,
as the earmarks before reservations did.

A reservation with a known start is kept from pass to pass (in Redis, written by the pass
that holds the dispatcher's turn) and bound on every job, whatever its priority: so if
every job ends by its limit, no reserved job starts later than the reservation it was
first given. A job of higher priority submitted later gets its own reservation after it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from app.store.cluster import HostView
from app.store.jobs import Holding
from scheduler.planner.candidates import Candidate
from scheduler.planner.fit import Closed, allowed

GPU = tuple[str, int]  # (host, index)


class Reservation(NamedTuple):
    """GPUs set aside for a PENDING job, from `start` on."""

    job_id: int
    host: str
    gpus: tuple[int, ...]
    start: float | None  # the earliest it can start; None: unknown (a holder has no limit)
    limit_s: int | None  # the job's own limit: its GPUs free again by start + limit_s

    def end(self) -> float | None:
        """By when the reserved job will have ended, or None (unknown)."""
        if self.start is None or self.limit_s is None:
            return None
        return self.start + self.limit_s

    def dump(self) -> list[object]:
        return [self.job_id, self.host, list(self.gpus), self.start, self.limit_s]

    @classmethod
    def load(cls, row: list[object]) -> Reservation:
        job_id, host, gpus, start, limit_s = row
        assert isinstance(gpus, list)
        return cls(int(str(job_id)), str(host), tuple(int(i) for i in gpus),
                   None if start is None else float(str(start)),
                   None if limit_s is None else int(str(limit_s)))


def dumps(reservations: Iterable[Reservation]) -> str:
    return json.dumps([r.dump() for r in reservations])


def loads(text: str | bytes | None) -> dict[int, Reservation]:
    """Reservations as `dumps` wrote them, by job id; none from a missing or bad value."""
    try:
        rows = json.loads(text) if text else []
        return {r.job_id: r for r in map(Reservation.load, rows)}
    except (ValueError, TypeError, AssertionError):
        return {}


def held_until(held: Iterable[Holding], now: float) -> dict[GPU, float | None]:
    """When each GPU a gpuq job holds frees, by that job's limit (None: it has none). An
    attempt not yet RUNNING is counted from now."""
    ends: dict[GPU, float | None] = {}
    for row in held:
        if row.host is None:
            continue
        began = row.started_at if row.started_at is not None else now
        end = None if row.time_limit_s is None else began + row.time_limit_s
        ends.update({(row.host, i): end for i in row.gpu_ids or []})
    return ends


class Book:
    """The reservations of one pass: those carried from earlier passes, and those it makes."""

    def __init__(self, now: float, depth: int, ends: dict[GPU, float | None],
                 carried: Mapping[int, Reservation]) -> None:
        self.now = now
        self.depth = max(1, depth)
        self.ends = ends  # busy GPUs: when each frees (None: unknown)
        self.carried = dict(carried)
        self.made: dict[int, Reservation] = {}  # job id: its reservation, made or kept
        self.reached: set[int] = set()  # jobs whose carried reservation this pass settled
        # Each GPU's reservations, earliest first: one may follow another on a GPU.
        self.by_gpu: dict[GPU, list[Reservation]] = {}
        for r in self.carried.values():
            self._hold(r)

    def _hold(self, r: Reservation) -> None:
        for i in r.gpus:
            held = self.by_gpu.setdefault((r.host, i), [])
            held.append(r)
            held.sort(key=lambda h: _key(h.start))

    def _drop(self, job_id: int) -> None:
        for r in (self.carried.pop(job_id, None), self.made.pop(job_id, None)):
            if r is not None:
                for i in r.gpus:
                    held = self.by_gpu.get((r.host, i), [])
                    held[:] = [h for h in held if h.job_id != job_id]
                    if not held:
                        self.by_gpu.pop((r.host, i), None)

    def _others(self, job: Candidate, gpu: GPU) -> list[Reservation]:
        return [r for r in self.by_gpu.get(gpu, []) if r.job_id != job.id]

    def holder(self, host: str, index: int) -> Reservation | None:
        """The first reservation a GPU is set aside for, or None."""
        held = self.by_gpu.get((host, index))
        return held[0] if held else None

    def closed(self, job: Candidate) -> Closed:
        """Which GPUs the job may not take now: those reserved for another job, unless its
        own limit ends by the first such reservation's start (backfill)."""
        def closed(host: str, index: int) -> bool:
            others = self._others(job, (host, index))
            return bool(others) and not self.ends_by(job, others[0].start)
        return closed

    def ends_by(self, job: Candidate, start: float | None) -> bool:
        """Whether the job, started now, ends by `start` (a job without a limit never does)."""
        return (start is not None and job.time_limit_s is not None
                and self.now + job.time_limit_s <= start)

    def set_aside(self, hosts: list[HostView]) -> int:
        """How many free GPUs no job may take now (reserved with an unknown start)."""
        return sum(1 for h in hosts for i in h.free
                   if any(r.start is None for r in self.by_gpu.get((h.name, i), [])))

    def holds(self, job: Candidate) -> bool:
        """Whether the job holds a reservation carried from an earlier pass."""
        return job.id in self.carried

    def started(self, job: Candidate, host: str, gpus: list[int]) -> None:
        """The job took these GPUs now: they free by its limit, and its reservation goes."""
        end = None if job.time_limit_s is None else self.now + job.time_limit_s
        self.ends.update({(host, i): end for i in gpus})
        self.passed(job)

    def passed(self, job: Candidate) -> None:
        """The pass reached the job and it needs no reservation (started, refused, over a
        limit): one carried for it goes."""
        self.reached.add(job.id)
        self._drop(job.id)

    def reserve(self, job: Candidate, hosts: list[HostView]) -> Reservation | None:
        """The job cannot start now: keep its reservation or make one; None when it is past
        the depth, or no host could hold it even once its gpuq jobs end."""
        self.reached.add(job.id)
        kept = self.carried.get(job.id)
        if kept is not None:
            self._drop(job.id)
            host = next((h for h in hosts if h.name == kept.host), None)
            if host is not None and set(kept.gpus) <= set(allowed(job, host.serving)):
                start = self._start(job, host, list(kept.gpus))
                if start is None or start > kept.start:  # type: ignore[operator]
                    start = kept.start  # its holders ended late: the promise stands
                return self._made(kept._replace(start=start))
        if len([r for r in self.made.values() if r.job_id != job.id]) >= self.depth:
            return None
        options = []
        for host in hosts:
            ids = self._fitting(job, host)
            if len(ids) < job.gpus:
                continue
            gpus = sorted(ids, key=lambda i: (_key(self._free_at(job, host, i)), i))[:job.gpus]
            start = self._start(job, host, gpus)
            unheld = len([i for i in host.free if (host.name, i) not in self.by_gpu])
            options.append(((_key(start), -unheld, host.name), host.name, gpus, start))
        if not options:
            return None
        _, name, gpus, start = min(options)
        return self._made(Reservation(job.id, name, tuple(sorted(gpus)), start,
                                      job.time_limit_s))

    def _made(self, r: Reservation) -> Reservation:
        self.made[r.job_id] = r
        self._hold(r)
        return r

    def _fitting(self, job: Candidate, host: HostView) -> list[int]:
        """The GPUs of the host that the job may use, in service."""
        return allowed(job, host.serving)

    def _free_at(self, job: Candidate, host: HostView, index: int) -> float | None:
        """When a GPU is free for the job: now if free and reserved for nobody else; else
        when its holder ends by its limit, or the reservation it is set aside for ends."""
        others = self._others(job, (host.name, index))
        if others:  # after the last of them: all must have ended
            ends = [r.end() for r in others]
            return None if any(e is None for e in ends) else max(e for e in ends if e is not None)
        if index in host.free:
            return self.now
        return self.ends.get((host.name, index))

    def _start(self, job: Candidate, host: HostView, gpus: list[int]) -> float | None:
        times = [self._free_at(job, host, i) for i in gpus]
        return None if any(t is None for t in times) else max(t for t in times if t is not None)

    def kept(self) -> list[Reservation]:
        """What the next pass carries: the reservations with a known start, made or kept
        in this pass or carried for jobs it did not reach."""
        found = {**{k: r for k, r in self.carried.items() if k not in self.reached},
                 **self.made}
        return [r for r in found.values() if r.start is not None]


def _key(start: float | None) -> float:
    return math.inf if start is None else start
