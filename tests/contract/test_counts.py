"""The kept counts of jobs per launch and state (app/store/counts.py) always equal a count
of the jobs themselves: after submissions, launches, dispatch, cancels, restarts, ends and
prunes, in one process and from several at once; a transaction rolled back adds nothing."""

from __future__ import annotations

import multiprocessing
import time

import pytest
from sqlalchemy import func, update
from sqlmodel import col, select

from app.client import Client
from app.core.states import JobState
from app.runtime import Runtime
from app.store import counts
from app.store.jobs import attempt_is, transition
from app.store.models import Job
from scheduler.dispatch.allocator import Dispatcher
from scheduler.dispatch.reconcile import prune_finished_jobs
from tests.contract.test_allocator import _bring_up


def _counted(rt: Runtime) -> tuple[dict[str, int], dict[int, dict[str, int]]]:
    """Jobs per state and per launch and state, counted row by row."""
    with rt.session() as session:
        rows = session.exec(select(col(Job.launch_id), col(Job.state), func.count())
                            .group_by(col(Job.launch_id), col(Job.state))).all()
    by_state: dict[str, int] = {}
    by_launch: dict[int, dict[str, int]] = {}
    for launch_id, state, n in rows:
        by_state[state] = by_state.get(state, 0) + n
        if launch_id is not None:
            by_launch.setdefault(launch_id, {})[state] = n
    return by_state, by_launch


def assert_counts_true(rt: Runtime) -> None:
    by_state, by_launch = _counted(rt)
    with rt.session() as session:
        assert counts.totals(session) == by_state
        assert counts.of_launches(session, list(by_launch)) == by_launch
        assert counts.total(session) == sum(by_state.values())
        for state, n in by_state.items():
            assert counts.total(session, [state]) == n


def test_counts_follow_every_change_of_state(rt: Runtime, local: Client):
    _bring_up(rt, "h", 2)
    sweep = local.launch("true # sweep", num_jobs=50, gpus=1)
    lone = local.submit("true # lone", max_restarts=1)
    after = local.submit("true # after", after=[lone.id])
    small = local.launch("true # small", num_jobs=3)
    Dispatcher(rt).dispatch()  # two replicas of the sweep STARTING
    assert_counts_true(rt)

    local.call("cancel", ids=[small.job_ids[0]])
    sweep.cancel()  # the PENDING replicas CANCELLED, the STARTING CANCELLING
    with rt.session() as session:
        started = session.exec(select(Job).where(col(Job.state) == "CANCELLING")).all()
        for job in started:
            transition(session, JobState.CANCELLED, "ended", attempt_is(job.id, job.attempt),
                       {"ended_at": time.time()}, only_from=[JobState.CANCELLING])
    assert_counts_true(rt)

    with rt.session() as session:  # the lone job fails once: a restart, then it runs again
        transition(session, JobState.RECOVERING, "restart", [col(Job.id) == lone.id],
                   only_from=[JobState.PENDING, JobState.STARTING])
    assert_counts_true(rt)

    with rt.session() as session:  # everything ends long ago, and is pruned
        session.execute(update(Job).values(ended_at=time.time() - 400 * 86400))
    with rt.session() as session:
        transition(session, JobState.CANCELLED, "old", [col(Job.id).in_(
            [lone.id, after.id, *small.job_ids])], {"ended_at": time.time() - 400 * 86400})
    assert_counts_true(rt)
    assert prune_finished_jobs(rt, days=30) > 0
    assert_counts_true(rt)
    with rt.session() as session:
        assert counts.totals(session) == {}


def test_a_transaction_rolled_back_counts_nothing(rt: Runtime, local: Client):
    local.launch("true # kept", num_jobs=4)
    with pytest.raises(RuntimeError), rt.session() as session:
        transition(session, JobState.CANCELLED, "undone", [col(Job.state) == "PENDING"])
        raise RuntimeError("the transaction fails after the move")
    assert_counts_true(rt)
    with rt.session() as session:
        assert counts.totals(session) == {"PENDING": 4}


def _cancel_one_by_one(settings, ids: list[int]) -> None:  # type: ignore[no-untyped-def]
    rt = Runtime(settings)
    for job_id in ids:
        with rt.session() as session:
            transition(session, JobState.CANCELLED, "by a writer", [col(Job.id) == job_id])
    rt.close()


def test_writers_in_several_processes_at_once_keep_the_counts_true(rt: Runtime, local: Client):
    launch = local.launch("true # contended", num_jobs=400)
    ids = launch.job_ids
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_cancel_one_by_one, args=(rt.settings, ids[i::4]))
             for i in range(4)]
    for proc in procs:
        proc.start()
    local.launch("true # meanwhile", num_jobs=100)
    for proc in procs:
        proc.join(timeout=300)
        assert proc.exitcode == 0
    assert_counts_true(rt)
    with rt.session() as session:
        assert counts.of_launches(session, [launch.id]) == {launch.id: {"CANCELLED": 400}}


def test_recount_repairs_counts_a_hand_edit_left_behind(rt: Runtime, local: Client):
    launch = local.launch("true # edited", num_jobs=5)
    with rt.session() as session:
        session.execute(update(Job).where(col(Job.launch_id) == launch.id)
                        .values(state="SUCCEEDED"))
    with rt.session() as session:
        assert counts.of_launches(session, [launch.id]) == {launch.id: {"PENDING": 5}}
        assert counts.recount(session) == {"rows": 1, "jobs": 5}
    assert_counts_true(rt)
