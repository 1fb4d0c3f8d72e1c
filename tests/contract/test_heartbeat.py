"""A GPU worker's heartbeat thread on real Redis and a real database: no error of any kind
takes its GPU out of service, and it puts its GPU back in an inventory Redis lost."""

from __future__ import annotations

import time

from app.core import keys
from app.store import cluster
from scheduler.worker.heartbeat import Heartbeat
from scheduler.worker.lease import Lease
from scheduler.worker.monitor import FakeProvider
from tests.support.servers import until


class FailingProvider(FakeProvider):
    """NVML that fails on its first few readings, as a driver hiccup does."""

    failures_left: int = 3

    def readings(self):  # type: ignore[no-untyped-def]
        if self.failures_left > 0:
            self.failures_left -= 1
            raise RuntimeError("NVML: GPU is lost")
        return super().readings()


def test_an_error_that_is_not_redis_does_not_stop_the_heartbeat(rt):
    provider = FailingProvider(1)
    provider.failures_left = 0
    beat = Heartbeat(rt, 0, provider)
    beat.start()
    try:
        provider.failures_left = 1_000_000  # every reading fails from now on
        rt.redis.delete(keys.alive("testhost", 0))
        # Then the thread lives on and beats again, reading or no reading
        until(lambda: rt.redis.exists(keys.alive("testhost", 0)), timeout_s=30)
        provider.failures_left = 0
        rt.redis.delete(keys.alive("testhost", 0))
        until(lambda: rt.redis.exists(keys.alive("testhost", 0)), timeout_s=30)
        assert beat._thread.is_alive()
    finally:
        beat.stop()


def test_a_gpu_redis_forgot_is_registered_again_by_its_heartbeat(rt):
    beat = Heartbeat(rt, 1, FakeProvider(2))
    beat.start()
    try:
        rt.redis.delete(keys.HOSTS, keys.host_gpus("testhost"))  # Redis lost the inventory
        until(lambda: [h.name for h in cluster.read_hosts(rt.redis)] == ["testhost"],
              timeout_s=30)
        assert cluster.read_hosts(rt.redis)[0].indices == [1]
    finally:
        beat.stop()


def test_a_gpu_taken_for_dead_asks_for_a_pass_when_it_beats_again(rt):
    # A GPU whose worker was too slow to beat was left out of every pass since; with no job
    # ending to wake the dispatcher, its next beat must ask for one itself.
    assert cluster.beat(rt.redis, "testhost", 0, ttl_s=30) is True, "a new GPU asks"
    rt.redis.delete(keys.DISPATCH_DIRTY)
    assert cluster.beat(rt.redis, "testhost", 0, ttl_s=30) is False
    assert not rt.redis.exists(keys.DISPATCH_DIRTY), "a GPU alive all along asks nothing"
    assert 0 < rt.redis.ttl(keys.alive("testhost", 0)) <= 30
    rt.redis.delete(keys.alive("testhost", 0))  # its beat came too late: taken for dead
    assert cluster.beat(rt.redis, "testhost", 0, ttl_s=30) is True
    assert rt.redis.exists(keys.DISPATCH_DIRTY)


def test_a_hold_that_goes_with_no_pass_after_it_asks_for_one(rt):
    # A hold written back by a late refresh, or left by a worker that died, expires with no
    # job ending to wake the dispatcher: the GPU's heartbeat asks for a pass when it sees
    # its GPU come free.
    beat = Heartbeat(rt, 0, FakeProvider(1))  # not started: its readings are taken here
    rt.redis.set(keys.hold("testhost", 0), "96.1", ex=30)
    beat.publish_reading()
    rt.redis.delete(keys.DISPATCH_DIRTY)
    beat.publish_reading()
    assert not rt.redis.exists(keys.DISPATCH_DIRTY), "still held: nothing to ask"
    rt.redis.delete(keys.hold("testhost", 0))  # it expired
    beat.publish_reading()
    assert rt.redis.exists(keys.DISPATCH_DIRTY)


def test_a_stopped_lease_refreshes_no_hold_after_its_gpus_are_released(rt):
    # Its threads are over when stop() returns: a refresh under way cannot write the holds
    # back once the attempt has released them.
    lease = Lease(rt, 7, 1, "testhost", [0, 1])
    lease.start()
    until(lambda: rt.redis.exists(keys.hold("testhost", 0)), timeout_s=30)  # refreshed
    lease.stop()
    assert not any(thread.is_alive() for thread in lease._threads)
    cluster.release(rt.redis, "testhost", [0, 1], cluster.holder(7, 1))
    time.sleep(1.0)  # (past the watcher's poll: any refresh still running would show)
    assert not rt.redis.exists(keys.hold("testhost", 0), keys.hold("testhost", 1))
