"""A worker that stopped taking messages from its queues is noticed and started anew.

Celery's Redis consumer can come back from broker outages connected but consuming nothing
(celery/celery#8030, #10205): messages wait in the worker's queue while the worker sits idle,
and a GPU worker's heartbeat, a thread of its own, goes on announcing its GPU. Every job
routed there would wait for its lease to run out, be routed there again, and never run.

The watch looks every few seconds. A queue of this worker that has held messages for
`stall_s` on end, while the worker held none of its own (nothing reserved, nothing running),
means its consumer is wedged: the worker shuts down as on SIGTERM, and its supervisor (`gpuq
up`, `gpuq worker`) starts it anew. A live consumer takes a message within milliseconds of
being idle, so a healthy worker never meets the condition; a worker busy with jobs is left
alone until they end.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence

import redis

log = logging.getLogger(__name__)

# kombu's Redis transport keeps a queue's messages of priority p > 0 in the list
# `<queue>\x06\x16<p>`, for its priority steps.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
# How long a worker that was told to shut down may take before it is ended outright.
SHUTDOWN_GRACE_S = 30.0


def queue_keys(queues: Sequence[str]) -> list[str]:
    return [key for q in queues
            for key in (q, *(f"{q}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS))]


class Stall:
    """How long a worker's queues have waited on an idle worker; a pure function of what
    it is shown, so that the rule is tested without a broker."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self._since: float | None = None

    def observe(self, now: float, waiting: int, held: int) -> bool:
        """True once messages have waited `stall_s` on end while the worker held none."""
        if waiting == 0 or held > 0:
            self._since = None
            return False
        if self._since is None:
            self._since = now
        return now - self._since >= self.stall_s


def _held_by_this_worker() -> int:
    from celery.worker import state

    return len(state.reserved_requests) + len(state.active_requests)


class ConsumerWatch:
    def __init__(self, client: redis.Redis, queues: Sequence[str], stall_s: float,
                 check_s: float, held: Callable[[], int] = _held_by_this_worker,
                 on_stall: Callable[[], None] | None = None) -> None:
        self.client = client
        self.keys = queue_keys(queues)
        self.check_s = check_s
        self.stall = Stall(stall_s)
        self.held = held
        self.on_stall = on_stall or _restart_this_worker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpuq-consumer-watch",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def waiting(self) -> int:
        pipe = self.client.pipeline(transaction=False)
        for key in self.keys:
            pipe.llen(key)
        return sum(pipe.execute())

    def check(self) -> bool:
        """One look; True (and the worker told to restart) when its consumer is wedged."""
        try:
            waiting = self.waiting()
        except redis.RedisError:  # the broker is away: nothing is known to wait
            waiting = 0
        if not self.stall.observe(time.monotonic(), waiting, self.held()):
            return False
        log.error("%d message(s) waited %.0fs in %s while this worker took none: its "
                  "consumer is wedged; restarting the worker", waiting, self.stall.stall_s,
                  ", ".join(self.keys[::len(_PRIORITY_STEPS) + 1]))
        self._stop.set()
        self.on_stall()
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.check_s):
            try:
                self.check()
            except Exception:
                log.exception("consumer watch round failed; trying again")


def _restart_this_worker() -> None:
    """Celery's warm shutdown (the GPU leaves service, the worker exits); the supervisor
    starts the worker again. A shutdown that itself hangs is ended outright."""
    os.kill(os.getpid(), signal.SIGTERM)
    timer = threading.Timer(SHUTDOWN_GRACE_S, os._exit, args=(75,))
    timer.daemon = True
    timer.start()
