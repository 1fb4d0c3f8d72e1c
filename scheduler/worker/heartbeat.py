"""A GPU worker's liveness key, its GPU's place in the host's inventory, and its readings,
refreshed from a thread that nothing stops but the worker's shutdown: an error of any kind
(the broker away, a database error while serving a dispatch request, an NVML error) is
logged and the next round tries again, so a GPU never silently leaves service."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import redis

from app.core import keys
from app.runtime import Runtime
from app.store import cluster
from scheduler.dispatch.allocator import Dispatcher
from scheduler.worker.monitor import GpuProvider, detect_provider, is_busy

log = logging.getLogger(__name__)

DISPATCH_CHECK_S = 0.5
# Passes the heartbeat runs per request before it beats again: while requests keep coming
# (a busy queue, a loaded machine) a pass loop could outlast the liveness key's TTL, and
# the GPU would drop out of service; what is left stays flagged for the next round.
HEARTBEAT_PASSES = 2


class Heartbeat:
    def __init__(self, rt: Runtime, gpu_index: int, provider: GpuProvider | None = None) -> None:
        self.rt = rt
        self.host = rt.settings.hostname
        self.index = gpu_index
        self.provider = provider or detect_provider(rt.settings)
        self.ttl_s = max(3, int(rt.settings.heartbeat_s * 3))
        self._next_reading = 0.0
        self._was_foreign = False
        self._was_held = False  # its hold at the last reading
        self._description: dict[str, object] | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # a dispatch request to serve now
        self._thread = threading.Thread(target=self._loop, name="gpuq-heartbeat", daemon=True)

    def start(self) -> None:
        from scheduler.worker.recovery import recover_orphans

        recover_orphans(self.rt, self.index)
        self.beat()
        # The GPU just became available: route whatever waits for it (a bounded number of
        # passes: the worker consumes nothing until this returns).
        Dispatcher(self.rt).dispatch(max_passes=HEARTBEAT_PASSES)
        self._thread.start()

    def beat(self) -> None:
        if self._stop.is_set():  # a beat after stop() would put the key back
            return
        cluster.beat(self.rt.redis, self.host, self.index, self.ttl_s)
        # Redis may have lost the inventory `gpuq worker` wrote (a restart without
        # persistence, a flush): put this GPU back, or nothing is ever routed to it.
        cluster.ensure_registered(self.rt.redis, self.host, self.index, self._described())
        if time.monotonic() >= self._next_reading:
            self.publish_reading()
            self._next_reading = time.monotonic() + self.rt.settings.monitor_interval_s

    def _described(self) -> dict[str, object]:
        if self._description is None:
            readings = self.provider.readings()
            found = readings[self.index] if self.index < len(readings) else None
            self._description = {"name": getattr(found, "name", "unknown"),
                                 "memory_total_mb": getattr(found, "memory_total_mb", 0),
                                 "provider": self.provider.kind}
        return self._description

    def publish_reading(self) -> None:
        """Store this GPU's reading; `foreign` marks use by processes outside gpuq.

        A GPU that gpuq holds is never called foreign: its usage is the job's own. Right
        after a job ends its memory may still show for one reading; the GPU is then skipped
        for one interval, the safe side of the mistake."""
        readings = self.provider.readings()
        if self.index >= len(readings):
            return
        reading = readings[self.index]
        held = cluster.is_held(self.rt.redis, self.host, self.index)
        if self._was_held and not held:
            # Its hold went without a pass to give the GPU out again (it expired: its job's
            # worker died, or released it before a late refresh wrote it back): ask for one.
            self.rt.redis.set(keys.DISPATCH_DIRTY, 1)
        self._was_held = held
        foreign = not held and is_busy(reading, self.rt.settings)
        interval = self.rt.settings.monitor_interval_s
        cluster.publish_reading(self.rt.redis, self.host, self.index,
                                {**reading.as_dict(), "foreign": foreign},
                                ttl_s=max(3, int(interval * 3)))
        if foreign:
            # Wake the dispatcher when this clears instead of waiting for the periodic pass.
            self._was_foreign = True
        elif self._was_foreign:
            self._was_foreign = False
            Dispatcher(self.rt).dispatch(max_passes=HEARTBEAT_PASSES)

    def _loop(self) -> None:
        next_beat = time.monotonic() + min(self.rt.settings.heartbeat_s,
                                           self.rt.settings.monitor_interval_s)
        while True:
            woken = self._wake.wait(DISPATCH_CHECK_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                # A dispatch request nobody served yet (its caller had to return): serve it.
                if woken or self.rt.redis.exists(keys.DISPATCH_DIRTY):
                    Dispatcher(self.rt).dispatch(max_passes=HEARTBEAT_PASSES)
                if time.monotonic() >= next_beat:
                    self.beat()
                    next_beat = time.monotonic() + min(self.rt.settings.heartbeat_s,
                                                       self.rt.settings.monitor_interval_s)
            except redis.RedisError as e:  # the broker is away; keep trying
                log.warning("heartbeat failed: %s", e)
            except Exception:  # anything else: say so, and keep the GPU in service
                log.exception("heartbeat round failed; trying again")

    def wake(self) -> None:
        """Serve the flagged dispatch request now rather than at the next check."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)  # a beat under way ends before the key goes
        # If the broker went first, the key expires by itself.
        with contextlib.suppress(redis.RedisError):
            cluster.stop_beating(self.rt.redis, self.host, self.index)


class CpuHeartbeat:
    """The CPU worker's slots kept in service: the dispatcher routes 0-GPU jobs only into
    slots that some host's live CPU worker offers and no job holds, so that a start message
    never waits on the CPU queue behind thousands of others."""

    def __init__(self, rt: Runtime, slots: int) -> None:
        self.rt = rt
        self.slots = slots
        self.ttl_s = max(3, int(rt.settings.heartbeat_s * 3))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpuq-cpu-heartbeat",
                                        daemon=True)

    def start(self) -> None:
        self.beat()
        # Slots just came into service: route the 0-GPU jobs that wait for them.
        Dispatcher(self.rt).dispatch(max_passes=HEARTBEAT_PASSES)
        self._thread.start()

    def beat(self) -> None:
        if not self._stop.is_set():
            cluster.beat_cpu(self.rt.redis, self.rt.settings.hostname, self.slots, self.ttl_s)

    def _loop(self) -> None:
        while not self._stop.wait(self.rt.settings.heartbeat_s):
            try:
                self.beat()
            except Exception as e:  # the broker away: keep trying, the key outlives a beat
                log.warning("CPU heartbeat failed: %s", e)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            cluster.stop_cpu(self.rt.redis, self.rt.settings.hostname)
