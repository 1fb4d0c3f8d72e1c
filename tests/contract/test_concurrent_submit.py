"""Concurrent submissions, in real processes on the real database: of identical jobs
submitted at the same moment exactly one is accepted, and two watchers of one jobs file
store each of its lines once."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import pytest

from app.core.settings import Settings

PROCESSES = 4
ROUNDS = 15


def _submitter(env: dict[str, str], barrier: Any, out: Any, what: str) -> None:
    """One process: in each round, wait for the others, then submit the round's job."""
    os.environ.update(env)
    from app.core.errors import DuplicateJob
    from app.ops.registry import call_local
    from app.runtime import Runtime

    rt = Runtime(Settings(_env_file=None))
    rt.check_broker()
    _ = rt.engine
    accepted = []
    for r in range(ROUNDS):
        barrier.wait(timeout=120)
        try:
            if what == "submit":
                call_local(rt, "submit", {"spec": {"command": f"echo round {r}"}})
            else:
                lines = call_local(rt, "submit_many", {
                    "origin": "/jobs.txt",
                    "specs": [{"command": f"echo round {r} line {n}"} for n in range(3)]})
                if not lines["submitted"]:
                    continue
            accepted.append(r)
        except DuplicateJob:
            pass
    out.put(accepted)
    rt.close()


def _hammer(settings: Settings, what: str) -> list[int]:
    """Every round's acceptances, counted over all processes."""
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(PROCESSES), ctx.Queue()
    env = settings.as_environment()
    procs = [ctx.Process(target=_submitter, args=(env, barrier, out, what))
             for _ in range(PROCESSES)]
    for proc in procs:
        proc.start()
    try:
        results = [out.get(timeout=300) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0] * PROCESSES
    return [sum(r in accepted for accepted in results) for r in range(ROUNDS)]


@pytest.mark.timeout(400)
def test_of_identical_jobs_submitted_at_once_exactly_one_is_accepted(settings, local):
    # Given four processes that submit the same job at the same moment, round after round
    # Then in every round exactly one of them is accepted and the others are refused
    assert _hammer(settings, "submit") == [1] * ROUNDS
    assert local.call("queue")["total"] == ROUNDS


@pytest.mark.timeout(400)
def test_two_watchers_of_one_file_store_each_line_once(settings, local):
    assert _hammer(settings, "submit_many") == [1] * ROUNDS
    assert local.call("queue", limit=100)["total"] == 3 * ROUNDS
