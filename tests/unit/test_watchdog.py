"""The consumer watch: a worker whose queue holds messages it never takes is restarted; one
that is busy, or whose queue is empty, is left alone."""

from __future__ import annotations

import time

import redis

from scheduler.worker.watchdog import ConsumerWatch, Stall, queue_keys


def test_a_stall_is_messages_waiting_on_an_idle_worker_for_the_whole_period():
    stall = Stall(stall_s=10)
    assert not stall.observe(0, waiting=3, held=0)
    assert not stall.observe(9.9, waiting=3, held=0)
    assert stall.observe(10, waiting=3, held=0)


def test_a_busy_worker_or_an_empty_queue_starts_the_period_again():
    stall = Stall(stall_s=10)
    stall.observe(0, waiting=1, held=0)
    assert not stall.observe(6, waiting=1, held=1)  # it took one: alive
    assert not stall.observe(12, waiting=1, held=0)  # the period starts again at 12
    assert not stall.observe(15, waiting=0, held=0)
    assert not stall.observe(20, waiting=2, held=0)
    assert not stall.observe(29, waiting=2, held=0)
    assert stall.observe(30, waiting=2, held=0)


def test_every_priority_list_of_a_queue_is_counted(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    queue = "gpu.watchdog-test.0"
    keys = queue_keys([queue])
    assert keys[0] == queue and len(keys) == 4
    restarted: list[bool] = []
    held = [0]
    watch = ConsumerWatch(client, [queue], stall_s=0.2, check_s=0.05,
                          held=lambda: held[0], on_stall=lambda: restarted.append(True))
    try:
        client.delete(*keys)
        assert watch.waiting() == 0
        assert not watch.check() and not watch.check()
        client.rpush(keys[2], "a message of priority 6")
        assert watch.waiting() == 1
        held[0] = 1  # the worker holds one of its own: alive
        assert not watch.check()
        held[0] = 0
        assert not watch.check()  # the period starts now
        time.sleep(0.25)
        assert watch.check()
        assert restarted == [True]
    finally:
        client.delete(*keys)
        client.close()
