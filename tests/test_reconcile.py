"""Reconciliation on real Redis and a real database: lost start messages are requeued,
jobs of dead workers settled by their restart policy, healthy jobs left alone."""

from __future__ import annotations

import time

from sqlmodel import Session, col, update

from app.core import keys
from app.core.keys import CPU_QUEUE, gpu_queue
from app.stack.host import register_host
from app.store.models import Job
from scheduler.dispatch.allocator import Dispatcher
from scheduler.dispatch.reconcile import reconcile, settle
from scheduler.worker.attempt import run_attempt
from scheduler.worker.monitor import FakeProvider


def _bring_up(rt, count: int = 1) -> None:
    register_host(rt, FakeProvider(count), "h")
    for i in range(count):
        rt.redis.set(keys.alive("h", i), 1, ex=60)


def test_lost_start_message_is_requeued_and_a_late_copy_refused(rt, local):
    _bring_up(rt)
    job = local.submit("echo once")
    assert job.status == "STARTING"
    assert reconcile(rt) == {"requeued": [], "settled": []}, "held: still on its way"
    rt.redis.delete(gpu_queue("h", 0), keys.hold("h", 0))  # lost, reservation expired
    assert reconcile(rt)["requeued"] == [job.id]
    row = local.call("job", job_id=job.id)
    assert row["status"] == "STARTING" and row["events"][-2]["reason"].startswith(
        "its start message was lost")
    with Session(rt.engine) as session:
        assert session.get(Job, job.id).attempt == 2
    assert run_attempt(rt, job.id, 1) == "skipped (STARTING)", "the old attempt never runs"


def test_cpu_job_is_requeued_only_when_its_message_is_gone(rt, local):
    job = local.submit("echo cpu", gpus=0)
    assert job.status == "STARTING" and rt.redis.llen(CPU_QUEUE) == 1
    with Session(rt.engine) as session:
        session.execute(update(Job).where(col(Job.id) == job.id).values(
            dispatched_at=time.time() - 3600))
        session.commit()
    assert reconcile(rt)["requeued"] == [], "its message still waits for a CPU slot"
    rt.redis.delete(CPU_QUEUE)
    assert reconcile(rt)["requeued"] == [job.id]


def _running_on_dead_worker(rt, local, max_restarts: int) -> int:
    _bring_up(rt)
    job = local.submit(f"sleep 100 # {max_restarts}", max_restarts=max_restarts)
    with Session(rt.engine) as session:
        session.execute(update(Job).where(col(Job.id) == job.id).values(
            state="RUNNING", started_at=time.time()))
        session.commit()
    rt.redis.delete(keys.hold("h", 0), keys.alive("h", 0))  # the host went away
    return job.id


def test_running_job_of_a_dead_worker_is_lost_without_restarts(rt, local):
    job_id = _running_on_dead_worker(rt, local, max_restarts=0)
    assert reconcile(rt)["settled"] == [job_id]
    row = local.rows([job_id])[0]
    assert row["status"] == "LOST" and "its worker died" in row["reason"]


def test_running_job_of_a_dead_worker_restarts_within_its_budget(rt, local):
    job_id = _running_on_dead_worker(rt, local, max_restarts=1)
    reconcile(rt)
    row = local.rows([job_id])[0]
    assert (row["status"], row["restart_count"]) == ("PENDING", 1)


def test_healthy_running_job_is_left_alone(rt, local):
    _bring_up(rt)
    job = local.submit("sleep 100 # healthy")
    Dispatcher(rt).dispatch()
    with Session(rt.engine) as session:
        session.execute(update(Job).where(col(Job.id) == job.id).values(state="RUNNING"))
        session.commit()
    assert reconcile(rt) == {"requeued": [], "settled": []}
    assert job.status == "RUNNING"


def test_reconcilers_on_several_hosts_at_once_settle_a_job_once(rt, local):
    # Given a job whose worker died, seen by two reconcilers before either acts
    job_id = _running_on_dead_worker(rt, local, max_restarts=3)
    with Session(rt.engine) as session:
        snapshot = session.get(Job, job_id)
        session.expunge(snapshot)
    # When both settle it, one after the other, from what they saw
    settle(rt, snapshot)
    rt.redis.set(keys.alive("h", 0), 1, ex=60)  # the host is back: the restart starts
    Dispatcher(rt).dispatch()
    assert local.rows([job_id])[0]["status"] == "STARTING"
    settle(rt, snapshot)
    # Then it restarted once, not twice
    row = local.call("job", job_id=job_id)
    assert row["restart_count"] == 1
    assert [e["to"] for e in row["events"]].count("RECOVERING") == 1

