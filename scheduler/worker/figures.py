"""An attempt's GPU figures: its peak memory and mean utilisation, from the monitor's readings.

Every GPU worker publishes its GPU's latest reading to Redis every monitor interval
(scheduler/worker/heartbeat.py); the worker that runs an attempt samples the readings of
all the attempt's GPUs (those other GPU workers publish too) while the job runs, from its
lease's Redis thread (scheduler/worker/lease.py), and once more when the job has ended.

- A reading counts when it was read while the job ran (its `at` from the job's start to its
  end); each reading (GPU, `at`) counts once however often it is sampled.
- Memory of a GPU in a reading: where NVML lists the GPU's processes with their memory
  (`processes`, [pid, MB] pairs), the sum over those of the job's process group; where it
  lists none of them (or lists none at all: the fake provider, MIG, no permission), the
  GPU's used memory.
- peak_memory_mb: the most, over the samples, of the sum over the attempt's GPUs of each
  GPU's memory in its latest counted reading: the most memory the job held at once.
- mean_utilization_pct: the mean of the GPU's utilisation over every counted reading of
  every GPU (NVML's device utilisation: the share of time a kernel ran, whoever's).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis

from app.core import keys


class Figures:
    def __init__(self, host: str, gpu_ids: Sequence[int]) -> None:
        self.host, self.gpu_ids = host, list(gpu_ids)
        self.started_at: float | None = None  # None: the job has not started
        self.pgid: int | None = None
        self.ended_at: float | None = None
        self._seen: dict[tuple[int, float], float] = {}  # (GPU, at) -> utilisation
        self._peak_mb: int | None = None
        self._lock = threading.Lock()

    def began(self, pid: int) -> None:
        """The job's process started (its group leader: `pid` is its process group)."""
        self.started_at, self.pgid = time.time(), pid

    def ended(self) -> None:
        if self.ended_at is None:
            self.ended_at = time.time()

    def sample(self, r: redis.Redis) -> None:
        """Read the latest readings of the attempt's GPUs and keep what they add."""
        if self.started_at is None or not self.gpu_ids:
            return
        with r.pipeline(transaction=False) as pipe:
            for index in self.gpu_ids:
                pipe.get(keys.reading(self.host, index))
            raw = pipe.execute()
        readings = [(index, json.loads(value)) for index, value in zip(self.gpu_ids, raw,
                                                                      strict=True) if value]
        self.add(readings)

    def add(self, readings: Sequence[tuple[int, dict[str, Any]]]) -> None:
        """One sample: each GPU's latest reading (GPUs without one left out)."""
        end = self.ended_at if self.ended_at is not None else time.time()
        total_mb, counted = 0, False
        with self._lock:
            for index, reading in readings:
                at = float(reading.get("at") or 0)
                if self.started_at is None or not self.started_at <= at <= end:
                    continue
                counted = True
                total_mb += self._memory_mb(reading)
                self._seen[(index, at)] = float(reading.get("utilization_pct") or 0)
            if counted:
                self._peak_mb = max(self._peak_mb or 0, total_mb)

    def _memory_mb(self, reading: dict[str, Any]) -> int:
        own = [mb for pid, mb in reading.get("processes") or []
               if mb is not None and self._in_group(int(pid))]
        return int(sum(own)) if own else int(reading.get("memory_used_mb") or 0)

    def _in_group(self, pid: int) -> bool:
        if self.pgid is None:
            return False
        with contextlib.suppress(OSError):
            return os.getpgid(pid) == self.pgid
        return False

    def result(self) -> tuple[int | None, float | None]:
        """(peak_memory_mb, mean_utilization_pct); None where no reading counted."""
        with self._lock:
            if not self._seen:
                return None, None
            return self._peak_mb, round(sum(self._seen.values()) / len(self._seen), 2)
