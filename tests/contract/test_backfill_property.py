"""The promise of a reservation, as a property over random job streams: run through the real
planner (real Redis, a real database) with simulated time, if every job ends by its limit,
no reserved job starts later than the reservation it was given when it first got one, even
when jobs of higher priority come after it."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import update
from sqlmodel import col, select

from app.core import keys
from app.runtime import Runtime
from app.stack.host import register_host
from app.store.models import Job
from scheduler.dispatch.allocator import Dispatcher
from scheduler.planner.reservations import loads
from scheduler.worker.monitor import FakeProvider

HOSTS = {"sim-a": 4, "sim-b": 2}


class SimulatedDispatcher(Dispatcher):
    """The real pass, on a clock the simulation moves."""

    now = 0.0

    def clock(self) -> float:
        return self.now


# A job: (GPUs, priority, limit in seconds, the share of its limit it runs, when it comes).
JOBS = st.lists(st.tuples(st.integers(1, 4), st.integers(0, 2), st.integers(1, 60),
                          st.floats(0.05, 1.0), st.sampled_from([0, 0, 0, 5, 20, 45])),
                min_size=1, max_size=12)


def _alive(rt: Runtime, up: bool) -> None:
    for host, count in HOSTS.items():
        for i in range(count):
            if up:
                rt.redis.set(keys.alive(host, i), 1, ex=600)
            else:
                rt.redis.delete(keys.alive(host, i))


def _arrive(rt: Runtime, local, jobs: list[tuple[int, int, int, float, int]]
            ) -> dict[int, float]:
    """Submit jobs, each job's id with how long it runs. No worker is alive meanwhile, so
    the passes a submission runs place nothing and keep no reservation on the real clock."""
    _alive(rt, False)
    runtime = {}
    for gpus, priority, limit, share, _ in jobs:
        job_id = local.submit("true", gpus=gpus, priority=priority, time_limit_s=limit,
                              allow_duplicate=True).id
        runtime[job_id] = max(1.0, limit * share)
    _alive(rt, True)
    return runtime


def _simulate(rt: Runtime, local, jobs: list[tuple[int, int, int, float, int]]) -> list[str]:
    """Run the jobs, each submitted at its time, to their ends; the broken promises, one
    line each."""
    sim = SimulatedDispatcher(rt)
    began = sim.now = time.time()
    coming = sorted(jobs, key=lambda j: j[4])
    runtime: dict[int, float] = {}
    first: dict[int, float] = {}
    ends: dict[int, tuple[float, str, list[int]]] = {}
    waiting: set[int] = set()
    broken: list[str] = []
    for _ in range(10 * len(jobs) + 10):
        now_in = [j for j in coming if began + j[4] <= sim.now]
        coming = coming[len(now_in):]
        if now_in:
            arrived = _arrive(rt, local, now_in)
            runtime.update(arrived)
            waiting |= set(arrived)
        sim._pass()
        with rt.session() as session:
            started = session.exec(select(Job).where(col(Job.id).in_(waiting),
                                                     col(Job.state) == "STARTING")).all()
            for job in started:
                assert job.id is not None and job.host is not None
                promised = first.get(job.id)
                if promised is not None and sim.now > promised + 1e-6:
                    broken.append(f"job {job.id} started {sim.now - promised:.3f} s late")
                ends[job.id] = (sim.now + runtime[job.id], job.host, list(job.gpu_ids or []))
                waiting.discard(job.id)
            session.execute(update(Job).where(col(Job.id).in_([j.id for j in started]))
                            .values(state="RUNNING", started_at=sim.now))
        for r in loads(rt.redis.get(keys.RESERVATIONS)).values():  # type: ignore[arg-type]
            if r.start is not None:
                first.setdefault(r.job_id, r.start)
        events = [end for end, _, _ in ends.values()] + [began + j[4] for j in coming]
        if not events:
            break
        sim.now = min(events)
        over = [k for k, (end, _, _) in ends.items() if end <= sim.now]
        with rt.session() as session:
            session.execute(update(Job).where(col(Job.id).in_(over))
                            .values(state="SUCCEEDED", ended_at=sim.now))
        for k in over:
            _, host, gpus = ends.pop(k)
            rt.redis.delete(*[keys.hold(host, i) for i in gpus])
    with rt.session() as session:
        left = session.exec(select(Job.id, Job.state, Job.gpus, Job.reason).where(
            col(Job.id).in_(waiting))).all()
    assert not waiting and not ends and not coming, f"jobs left: {left} {ends} of {jobs}"
    return broken


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(jobs=JOBS)
def test_no_reserved_job_starts_later_than_it_was_first_promised(rt, local, jobs):
    for host, count in HOSTS.items():
        register_host(rt, FakeProvider(count), host)
    assert _simulate(rt, local, jobs) == []
