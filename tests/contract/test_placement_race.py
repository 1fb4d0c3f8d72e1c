"""Placements written without races, in real processes on the real database: a GPU limit
holds however passes and `place_head` of several processes interleave, and a pass that read
a job before another attempt of it started cannot start it again."""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlmodel import col

from app.core import keys
from app.core.identity import stack_owner
from app.core.keys import gpu_queue
from app.core.settings import Settings
from app.runtime import Runtime
from app.stack.host import register_host
from app.store import limits
from app.store.models import HOLDING_STATES, Job
from scheduler.dispatch.allocator import Dispatcher, Start
from scheduler.planner.candidates import Candidate
from scheduler.worker.monitor import FakeProvider

PROCESSES = 6
ROUNDS = 9
GPUS = 8


def _placer(env: dict[str, str], start: Any, done: Any, n: int) -> None:
    """One process: in each round, wait for the others, then place what it can, as a
    pass would or as a submitter's `place_head` does."""
    os.environ.update(env)
    rt = Runtime(Settings(_env_file=None))
    _ = rt.engine, rt.celery
    dispatcher = Dispatcher(rt)
    for _round in range(ROUNDS):
        start.wait(timeout=120)
        try:
            if n % 2:
                dispatcher.place_head()
            dispatcher._pass()
        finally:
            done.wait(timeout=120)
    rt.close()


def _held(rt: Runtime, kind: str, name: str) -> int:
    column = col(Job.owner) if kind == "user" else col(Job.project)
    with rt.session() as session:
        return int(session.scalar(select(func.coalesce(func.sum(col(Job.gpus)), 0)).where(
            column == name, col(Job.state).in_(HOLDING_STATES))) or 0)


def _end_round(rt: Runtime) -> None:
    """Forget the round's placements: their jobs end, their GPUs are free again."""
    with rt.session() as session:
        session.execute(update(Job).where(col(Job.state).in_(HOLDING_STATES)).values(
            state="CANCELLED", ended_at=time.time()))
    for key in rt.redis.scan_iter(keys.hold("h", "*")):  # type: ignore[arg-type]
        rt.redis.delete(key)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("kind, most", [("user", 2), ("project", 1)])
def test_a_gpu_limit_holds_against_passes_racing_in_several_processes(rt, local, kind, most):
    # Given a host of 8 GPUs, a user (or project) capped below it, and plenty of its jobs
    register_host(rt, FakeProvider(GPUS), "h")
    for i in range(GPUS):
        rt.redis.set(keys.alive("h", i), 1, ex=600)
    name = stack_owner().name if kind == "user" else "vision"
    with rt.engine.begin() as conn:
        limits.write(conn, kind, name, {"max_gpus": most})
    local.launch("true", num_jobs=PROCESSES * ROUNDS * GPUS, gpus=1, project="vision")
    # When six processes place jobs at the same moment, round after round
    ctx = multiprocessing.get_context("spawn")
    start, done = ctx.Barrier(PROCESSES + 1), ctx.Barrier(PROCESSES + 1)
    env = rt.settings.as_environment()
    procs = [ctx.Process(target=_placer, args=(env, start, done, n)) for n in range(PROCESSES)]
    for proc in procs:
        proc.start()
    held = []
    try:
        for _round in range(ROUNDS):
            start.wait(timeout=120)
            done.wait(timeout=120)
            held.append(_held(rt, kind, name))
            _end_round(rt)
    finally:
        for proc in procs:
            proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0] * PROCESSES
    # Then in no round did its jobs hold more GPUs than the limit, and every round filled it
    assert held == [most] * ROUNDS


def test_a_pass_that_read_an_older_attempt_cannot_start_the_job_again(rt, local):
    # Given a job a pass read at attempt 0, which meanwhile ran its first attempt, failed
    # and waits out its restart backoff at attempt 1
    register_host(rt, FakeProvider(2), "h")
    for i in range(2):
        rt.redis.set(keys.alive("h", i), 1, ex=600)
    job_id = local.submit("false", gpus=1, max_restarts=3).id
    with rt.session() as session:
        row = session.get(Job, job_id)
        assert row is not None
        stale = Candidate(job_id, 1, None, 0, 0, None, row.owner, row.project,
                          row.submitted_at, None)
        session.execute(update(Job).where(col(Job.id) == job_id).values(
            state="PENDING", attempt=1, not_before=time.time() + 600))
    rt.redis.delete(gpu_queue("h", 0), gpu_queue("h", 1), keys.hold("h", 0), keys.hold("h", 1))
    # When the stale pass starts it
    started = Dispatcher(rt)._start(stale, "h", [0])
    # Then nothing moves: no second message for attempt 1, no backoff skipped
    assert started is Start.GONE
    with rt.session() as session:
        row = session.get(Job, job_id)
        assert row is not None and (row.state, row.attempt) == ("PENDING", 1)
    assert rt.redis.llen(gpu_queue("h", 0)) == 0
    assert rt.redis.get(keys.hold("h", 0)) is None
