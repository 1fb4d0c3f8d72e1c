"""Reconciliation on real Redis and a real database: an attempt whose lease ran out is
requeued (STARTING) or settled by its restart policy (RUNNING, CANCELLING), GPU and 0-GPU
alike; an attempt whose lease holds is left alone whatever Redis lost."""

from __future__ import annotations

import time

from sqlmodel import Session, col, select, update

from app.core import keys
from app.core.keys import CPU_QUEUE, gpu_queue
from app.stack.host import register_host
from app.store import cluster
from app.store.models import Job
from scheduler.dispatch.allocator import Dispatcher
from scheduler.dispatch.reconcile import reconcile, settle
from scheduler.worker.attempt import run_attempt
from scheduler.worker.monitor import FakeProvider


def _bring_up(rt, count: int = 1) -> None:
    register_host(rt, FakeProvider(count), "h")
    for i in range(count):
        rt.redis.set(keys.alive("h", i), 1, ex=60)


def _lease_ran_out(rt, job_id: int, **values) -> None:
    with Session(rt.engine) as session:
        session.execute(update(Job).where(col(Job.id) == job_id).values(
            lease_until=time.time() - 3600, **values))
        session.commit()


def test_lost_start_message_is_requeued_and_a_late_copy_refused(rt, local):
    _bring_up(rt)
    job = local.submit("echo once")
    assert job.status == "STARTING"
    rt.redis.delete(gpu_queue("h", 0), keys.hold("h", 0))  # lost, reservation gone too
    assert reconcile(rt) == {"requeued": [], "settled": []}, "its lease still holds"
    _lease_ran_out(rt, job.id)
    assert reconcile(rt)["requeued"] == [job.id]
    row = local.call("job", job_id=job.id)
    assert row["status"] == "STARTING" and row["events"][-2]["reason"].startswith(
        "its start message was lost")
    with Session(rt.engine) as session:
        assert session.get(Job, job.id).attempt == 2
    assert run_attempt(rt, job.id, 1) == "skipped (STARTING)", "the old attempt never runs"


def test_cpu_job_whose_start_message_was_lost_is_requeued_without_reading_the_queue(
        rt, local):
    # Given a host offering one CPU slot and a 0-GPU job routed into it
    cluster.beat_cpu(rt.redis, "h", 1, 600)
    job = local.submit("echo cpu", gpus=0)
    assert job.status == "STARTING" and rt.redis.llen(CPU_QUEUE) == 1
    rt.redis.delete(CPU_QUEUE)  # its message lost
    assert reconcile(rt)["requeued"] == [], "its lease still holds"
    # When its lease runs out, Then it is routed again at its next attempt
    _lease_ran_out(rt, job.id)
    assert reconcile(rt)["requeued"] == [job.id]
    with Session(rt.engine) as session:
        assert session.get(Job, job.id).attempt == 2
    assert rt.redis.llen(CPU_QUEUE) == 1


def test_zero_gpu_jobs_are_routed_only_into_free_cpu_slots(rt, local):
    # Given a host offering two CPU slots and 50 0-GPU jobs
    cluster.beat_cpu(rt.redis, "h", 2, 600)
    ids = local.launch("true", num_jobs=50, gpus=0).job_ids
    # When several passes run
    for _ in range(3):
        Dispatcher(rt).dispatch()
    # Then two start, one message each, and the rest wait without a lease
    rows = local.rows(ids)
    assert sorted(r["status"] for r in rows).count("STARTING") == 2
    assert rt.redis.llen(CPU_QUEUE) == 2
    with Session(rt.engine) as session:
        leased = session.exec(select(Job).where(col(Job.lease_until).is_not(None))).all()
        assert len(leased) == 2
    # And once the host's CPU worker is gone, no more are routed
    cluster.stop_cpu(rt.redis, "h")
    with Session(rt.engine) as session:
        session.execute(update(Job).where(col(Job.state) == "STARTING").values(
            state="SUCCEEDED", ended_at=time.time()))
        session.commit()
    Dispatcher(rt).dispatch()
    assert rt.redis.llen(CPU_QUEUE) == 2


def _running_on_dead_worker(rt, local, max_restarts: int, gpus: int = 1) -> int:
    _bring_up(rt)
    job = local.submit(f"sleep 100 # {max_restarts}", max_restarts=max_restarts, gpus=gpus)
    _lease_ran_out(rt, job.id, state="RUNNING", started_at=time.time())  # the host went away
    rt.redis.delete(keys.hold("h", 0), keys.alive("h", 0))  # and its keys expired
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


def test_a_0_gpu_job_of_a_dead_worker_is_settled_by_its_policy(rt, local):
    job_id = _running_on_dead_worker(rt, local, max_restarts=1, gpus=0)
    assert reconcile(rt)["settled"] == [job_id]
    row = local.rows([job_id])[0]
    assert (row["status"], row["restart_count"]) == ("PENDING", 1)


def test_a_cancelling_job_whose_host_is_gone_ends_cancelled(rt, local):
    _bring_up(rt)
    job = local.submit("sleep 100 # cancelling")
    _lease_ran_out(rt, job.id, state="CANCELLING", started_at=time.time())
    assert reconcile(rt)["settled"] == [job.id]
    assert local.rows([job.id])[0]["status"] == "CANCELLED"


def test_healthy_running_job_is_left_alone_when_redis_lost_everything(rt, local):
    _bring_up(rt)
    job = local.submit("sleep 100 # healthy")
    Dispatcher(rt).dispatch()
    with Session(rt.engine) as session:
        session.execute(update(Job).where(col(Job.id) == job.id).values(state="RUNNING"))
        session.commit()
    for key in rt.redis.scan_iter("gpuq:*"):  # holds, heartbeats, inventory: all gone
        rt.redis.delete(key)
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
    with Session(rt.engine) as session:  # (past its backoff)
        session.execute(update(Job).where(col(Job.id) == job_id).values(not_before=None))
        session.commit()
    Dispatcher(rt).dispatch()
    assert local.rows([job_id])[0]["status"] == "STARTING"
    settle(rt, snapshot)
    # Then it restarted once, not twice
    row = local.call("job", job_id=job_id)
    assert row["restart_count"] == 1
    assert [e["to"] for e in row["events"]].count("RECOVERING") == 1

