"""The allocator on real Redis and a real database, without workers: reservations are
atomic, dispatch follows priority, and impossible jobs fail at once."""

from __future__ import annotations

import json
import threading
import time

from sqlalchemy import update
from sqlmodel import col, select

from app.core import keys
from app.core.keys import gpu_queue
from app.runtime import Runtime
from app.stack.host import register_host
from app.store.cluster import enter_dispatch, refresh, release, reserve
from app.store.models import Job
from scheduler.dispatch.allocator import Dispatcher
from scheduler.worker.monitor import FakeProvider


def _bring_up(rt: Runtime, host: str, count: int) -> None:
    """Register a host's GPUs and mark their workers alive, as `gpuq worker` does."""
    register_host(rt, FakeProvider(count), host)
    for i in range(count):
        rt.redis.set(keys.alive(host, i), 1, ex=60)


def _queued(rt: Runtime, queue: str) -> list[list[int]]:
    """(job id, attempt) of every message waiting on a queue."""
    return [_args(m) for m in rt.redis.lrange(queue, 0, -1)]


def _args(message: bytes) -> list[int]:
    import base64

    body = json.loads(base64.b64decode(json.loads(message)["body"]))
    return list(body[0])


def test_concurrent_reservations_of_one_gpu_have_one_winner(rt):
    _bring_up(rt, "h", 2)
    wins: list[str] = []
    barrier = threading.Barrier(16)

    def contend(n: int) -> None:
        barrier.wait()
        if reserve(rt.redis, "h", [0, 1], f"{n}.1", 60):
            wins.append(f"{n}.1")

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert rt.redis.get(keys.hold("h", 0)) == rt.redis.get(keys.hold("h", 1)) == wins[0].encode()


def test_reservation_is_all_or_nothing_and_released_only_by_its_holder(rt):
    _bring_up(rt, "h", 3)
    assert reserve(rt.redis, "h", [1], "7.1", 60)
    assert not reserve(rt.redis, "h", [0, 1], "8.1", 60)
    assert rt.redis.get(keys.hold("h", 0)) is None, "a failed reservation must hold nothing"
    assert release(rt.redis, "h", [1], "7.0") == 0, "an older attempt cannot release"
    assert release(rt.redis, "h", [1], "7.1") == 1
    assert reserve(rt.redis, "h", [0, 1], "8.1", 60)


def test_a_gpu_whose_worker_is_not_alive_is_not_reserved(rt):
    _bring_up(rt, "h", 2)
    rt.redis.delete(keys.alive("h", 1))
    assert not reserve(rt.redis, "h", [1], "1.1", 60)
    assert reserve(rt.redis, "h", [0], "1.1", 60)


def test_dispatch_routes_higher_priority_first_then_fifo(rt, local):
    client = local
    low = [client.submit(f"echo low{n}", priority=0).id for n in range(2)]
    high = client.submit("true", priority=5).id
    _bring_up(rt, "h", 2)
    assert Dispatcher(rt).dispatch() == 2
    routed = {job_id for q in (gpu_queue("h", 0), gpu_queue("h", 1))
              for job_id, _ in _queued(rt, q)}
    assert routed == {high, low[0]}
    rows = {r["id"]: r for r in client.rows([*low, high])}
    assert rows[low[1]]["status"] == "PENDING"
    assert rows[high]["status"] == "STARTING" and rows[high]["host"] == "h"


def test_multi_gpu_job_gets_gpus_of_one_host(rt, local):
    _bring_up(rt, "a", 1)
    _bring_up(rt, "b", 2)
    job = local.submit("true", gpus=2)
    Dispatcher(rt).dispatch()
    row = job.row()
    assert (row["host"], row["gpu_ids"], row["status"]) == ("b", [0, 1], "STARTING")


def test_job_bigger_than_every_host_fails_at_once(rt, local):
    _bring_up(rt, "a", 2)
    job = local.submit("true", gpus=3)
    Dispatcher(rt).dispatch()
    row = job.row()
    assert row["status"] == "FAILED_NO_RESOURCE"
    assert "asks for 3 GPUs; the largest registered host has 2" in row["reason"]


def test_waiting_multi_gpu_job_is_not_passed_by_smaller_ones(rt, local):
    _bring_up(rt, "h", 2)
    client = local
    first = client.submit("sleep 100", gpus=1)
    Dispatcher(rt).dispatch()
    big = client.submit("true", gpus=2)
    small = client.submit("true", gpus=1)
    Dispatcher(rt).dispatch()
    assert first.status == "STARTING"
    assert big.status == "PENDING"
    assert small.status == "PENDING", "the free GPU is kept for the waiting 2-GPU job"


def test_allowed_gpu_list_is_honoured(rt, local):
    _bring_up(rt, "h", 4)
    job = local.submit("true", allowed_gpu_ids=[3])
    Dispatcher(rt).dispatch()
    assert job.row()["gpu_ids"] == [3]


def test_a_reservation_nobody_refreshes_expires_and_the_gpu_is_handed_out(rt, local):
    _bring_up(rt, "h", 1)
    assert reserve(rt.redis, "h", [0], "99.1", 1)  # its worker died: no more refreshes
    job = local.submit("echo next")
    Dispatcher(rt).dispatch()
    assert job.status == "PENDING"
    time.sleep(1.2)
    Dispatcher(rt).dispatch()
    assert job.row()["gpu_ids"] == [0]


def test_a_running_jobs_refresh_takes_back_a_reservation_lost_in_an_outage(rt):
    _bring_up(rt, "h", 2)
    assert reserve(rt.redis, "h", [0, 1], "7.1", 60)
    rt.redis.delete(keys.hold("h", 0))  # expired while Redis was away
    rt.redis.set(keys.hold("h", 1), "8.1")  # and another job was handed GPU 1 meanwhile
    refresh(rt.redis, "h", [0, 1], "7.1", 60)
    assert rt.redis.get(keys.hold("h", 0)) == b"7.1"
    assert 0 < rt.redis.ttl(keys.hold("h", 0)) <= 60
    assert rt.redis.get(keys.hold("h", 1)) == b"8.1", "never taken from another job"


def _foreign(rt: Runtime, host: str, index: int) -> None:
    """A process outside gpuq uses this GPU, as its worker's monitor reports."""
    rt.redis.set(keys.reading(host, index), json.dumps({"foreign": True}), ex=60)


def test_gpus_a_running_job_holds_in_the_database_are_not_handed_out_when_redis_lost_them(
        rt, local):
    # Given both GPUs running jobs, and Redis losing every reservation (a restart without
    # persistence, an eviction)
    _bring_up(rt, "h", 2)
    running = [local.submit(f"sleep 100 #{i}") for i in range(2)]
    assert [j.status for j in running] == ["STARTING", "STARTING"]
    for key in rt.redis.scan_iter("gpuq:hold:*"):
        rt.redis.delete(key)
    # When another job arrives and a pass runs
    waiting = local.submit("true # waits")
    Dispatcher(rt).dispatch()
    # Then it waits: the database still says who holds the GPUs
    assert waiting.status == "PENDING"
    assert sorted(_queued(rt, gpu_queue("h", 0)) + _queued(rt, gpu_queue("h", 1))) == sorted(
        [[j.id, 1] for j in running])


def test_a_job_that_cannot_fit_does_not_block_the_jobs_behind_it(rt, local):
    # Given a host of 2 GPUs whose GPU 1 is used by a process outside gpuq
    _bring_up(rt, "h", 2)
    _foreign(rt, "h", 1)
    # When a 2-GPU job comes first, then a 1-GPU job
    big = local.submit("true # needs both", gpus=2, priority=5)
    small = local.submit("true # needs one")
    # Then the small job takes GPU 0 at once, and the big one waits, saying why
    assert small.status == "STARTING" and small.row()["gpu_ids"] == [0]
    row = big.row()
    assert row["status"] == "PENDING" and row["reason"].startswith("waiting: no host has 2")


def test_gpu_ids_no_host_has_fail_the_job_at_once(rt, local):
    _bring_up(rt, "h", 2)
    job = local.submit("true # on GPU 7", allowed_gpu_ids=[7])
    assert job.status == "FAILED_NO_RESOURCE"
    assert "GPUs 7; no registered host has 1 of those" in job.row()["reason"]
    behind = local.submit("true # behind it")
    assert behind.status == "STARTING"


def test_gpu_ids_fewer_than_gpus_are_refused_at_submit(local):
    import pytest

    from app.core.errors import InvalidJobSpec

    with pytest.raises(InvalidJobSpec, match=r"--gpu-ids names 1 GPUs but the job asks for 2"):
        local.submit("true", gpus=2, allowed_gpu_ids=[0])
    with pytest.raises(InvalidJobSpec, match=r"distinct GPU indices"):
        local.submit("true", gpus=1, allowed_gpu_ids=[0, 0])


def test_a_job_is_not_refused_while_the_inventory_is_rebuilt_after_redis_lost_it(rt, local):
    # Given a host of 2 GPUs whose inventory Redis lost, and only GPU 0 back so far
    from app.store import cluster

    _bring_up(rt, "h", 2)
    for key in rt.redis.scan_iter("gpuq:*"):
        rt.redis.delete(key)
    cluster.ensure_registered(rt.redis, "h", 0, {"name": "Fake GPU"})
    rt.redis.set(keys.alive("h", 0), 1, ex=60)
    # When a 2-GPU job arrives
    job = local.submit("true # both", gpus=2)
    # Then it waits for the rest of the host instead of failing for good
    assert job.status == "PENDING"
    cluster.ensure_registered(rt.redis, "h", 1, {"name": "Fake GPU"})
    rt.redis.set(keys.alive("h", 1), 1, ex=60)
    Dispatcher(rt).dispatch()
    assert job.status == "STARTING"


def test_a_pass_examines_at_most_the_scan_limit_however_deep_the_blocked_queue(
        rt, local, monkeypatch):
    # Given GPU 3 held by a running job, and 3,000 jobs that need GPUs 2 and 3
    _bring_up(rt, "h", 4)
    holder = local.submit("sleep 100 # holds 3", allowed_gpu_ids=[3], priority=9)
    assert holder.status == "STARTING"
    local.launch("true # blocked", num_jobs=3000, gpus=2, allowed_gpu_ids=[2, 3])
    # and, 500 deep, one that fits GPU 0; 2,000 deep, one that fits GPU 1
    read: list[int] = []
    original = Dispatcher._pending_gpu_jobs

    def counting(self, after, size, group):  # type: ignore[no-untyped-def]
        found = original(self, after, size, group)
        read.append(len(found))
        return found

    monkeypatch.setattr(Dispatcher, "_pending_gpu_jobs", counting)
    limit = rt.settings.dispatch_scan_limit
    assert limit == 1000
    with rt.session() as session:  # give the two their places in the queue by id
        ids = sorted(session.exec(select(col(Job.id)).where(col(Job.launch_id).is_not(None))))
        session.execute(update(Job).where(col(Job.id) == ids[500])
                        .values(gpus=1, allowed_gpu_ids=[0]))
        session.execute(update(Job).where(col(Job.id) == ids[2000])
                        .values(gpus=1, allowed_gpu_ids=[1]))
        session.commit()
    # When a pass runs
    Dispatcher(rt)._pass()
    # Then it read no more than the limit, started the job 500 deep, not the one 2,000 deep
    assert sum(read) <= limit, read
    assert local.job(ids[500]).status == "STARTING"
    assert local.job(ids[2000]).status == "PENDING"



def test_a_submission_that_heads_the_queue_starts_while_another_holds_the_turn(rt, local):
    # Given two GPUs, one held by a running job, and another caller in the middle of a pass
    _bring_up(rt, "h", 2)
    assert local.submit("sleep 100 # holds one", priority=5).status == "STARTING"
    assert enter_dispatch(rt.redis, "another caller", 60)
    # When a job that heads the queue is submitted
    head = local.submit("true # heads the queue", priority=5)
    # Then it started at once, the request for the rest left flagged for the turn's holder
    assert head.status == "STARTING"
    assert rt.redis.exists(keys.DISPATCH_DIRTY)


def test_a_submission_behind_a_waiting_job_does_not_pass_it_outside_the_turn(rt, local):
    # Given a 2-GPU job waiting for the GPU a running job holds, and the turn taken
    _bring_up(rt, "h", 2)
    assert local.submit("sleep 100 # holds one", priority=9).status == "STARTING"
    waiting = local.submit("true # needs both", gpus=2, priority=5)
    assert enter_dispatch(rt.redis, "another caller", 60)
    # When a smaller job of lower priority is submitted
    small = local.submit("true # one GPU, lower priority", priority=1)
    # Then it does not take the GPU set aside for the waiting job
    assert (waiting.status, small.status) == ("PENDING", "PENDING")


def test_a_pass_whose_gpu_was_taken_meanwhile_tries_it_no_more(rt, local, monkeypatch):
    # Given one free GPU that another caller reserves after this pass read it free
    _bring_up(rt, "h", 1)
    local.launch("true # queued", num_jobs=50, priority=1)
    rt.redis.delete(*rt.redis.keys("gpuq:hold:*"))
    with rt.session() as session:
        session.execute(update(Job).values(state="PENDING", host=None, gpu_ids=None))
    tries: list[int] = []
    original = reserve

    def taken_meanwhile(r, host, gpus, token, ttl):  # type: ignore[no-untyped-def]
        tries.append(1)
        original(r, host, gpus, "another.1", ttl)
        return original(r, host, gpus, token, ttl)

    monkeypatch.setattr("scheduler.dispatch.allocator.reserve", taken_meanwhile)
    # When a pass runs
    routed = Dispatcher(rt)._pass()
    # Then it tried the GPU once and routed nothing
    assert (routed, len(tries)) == (0, 1)
