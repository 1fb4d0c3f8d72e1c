"""A GPU worker's liveness key, refreshed from a thread while the worker runs."""

from __future__ import annotations

import logging
import threading

import redis

from app import keys
from app.runtime import Runtime
from scheduler.allocator import Dispatcher

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, rt: Runtime, gpu_index: int) -> None:
        self.rt = rt
        self.key = keys.alive(rt.settings.hostname, gpu_index)
        self.ttl_s = max(3, int(rt.settings.heartbeat_s * 3))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpuq-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        # The GPU just became available: route whatever waits for it.
        Dispatcher(self.rt).dispatch()
        self._thread.start()

    def beat(self) -> None:
        self.rt.redis.set(self.key, 1, ex=self.ttl_s)

    def _loop(self) -> None:
        while not self._stop.wait(self.rt.settings.heartbeat_s):
            try:
                self.beat()
            except redis.RedisError as e:  # the broker is away; keep trying
                log.warning("heartbeat failed: %s", e)

    def stop(self) -> None:
        self._stop.set()
        self.rt.redis.delete(self.key)
