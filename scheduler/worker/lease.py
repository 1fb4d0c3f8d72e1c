"""An attempt's lease, and the watch that stops its job when gpuq no longer wants it run.

The job's row says until when this worker holds the attempt (`lease_until`). Two threads
keep it, so that a call that hangs (a database or Redis cut off by the network) never
delays the watch loop that must stop the job in time:

- the lease thread renews the row every heartbeat, fenced on (job id, attempt): a renewal
  that finds the attempt moved on (settled, run anew, or its lease already run out) means
  the job must stop now; one that finds it CANCELLING means a user cancelled it;
- the Redis thread polls the job's cancel flag, refreshes its GPU reservations (a cache
  of the database's holds, rebuilt if Redis lost them) and samples its GPUs' readings
  every monitor interval for the attempt's figures (scheduler/worker/figures.py).

A third thread keeps the attempt's time limit (`--time`, scheduler/worker/timelimit.py): it
sends the job's `--signal` once, that many seconds before the limit. The limit counts from
the recorded start and is read again with each renewal, so that `gpuq update --time`
reaches a running job.

`stop_reason()` is what the executor's loop asks: the job stops when a user cancels it, when
it reaches its time limit, when its worker shuts down, when its attempt was superseded, or
when the last renewal is older
than `Settings.lease_stop_s`, so that the job is gone (SIGTERM, then SIGKILL after the kill
grace) before the lease runs out. The reconciler settles an attempt only once its lease ran
out by `lease_margin_s` (scheduler/dispatch/reconcile.py): a job never runs in two places.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence

from sqlmodel import Session

from app.core import keys
from app.core.states import JobState
from app.runtime import Runtime
from app.store import cluster
from app.store.jobs import renew_lease
from scheduler.worker.executor import CANCEL, LEASE, SHUTDOWN, SUPERSEDED, TIMEOUT
from scheduler.worker.figures import Figures
from scheduler.worker.timelimit import TimeLimit

log = logging.getLogger(__name__)
STOP_JOIN_S = 10.0  # a Redis or database call under way ends within its own time-out

CANCEL_POLL_S = 0.25

# Set when this worker process shuts down: every attempt it runs stops its job and records
# how it ended (by the restart policy), instead of leaving it to run unwatched.
shutting_down = threading.Event()


def request_shutdown() -> None:
    shutting_down.set()


class Lease:
    def __init__(self, rt: Runtime, job_id: int, attempt: int, host: str,
                 gpu_ids: Sequence[int], time_limit_s: int | None = None,
                 signal: str | None = None) -> None:
        self.rt = rt
        self.job_id, self.attempt = job_id, attempt
        self.host, self.gpu_ids = host, list(gpu_ids)
        self.renewed_at = time.monotonic()
        self.superseded = False
        self.cancelled = False
        self.figures = Figures(host, gpu_ids)
        self.time_limit = TimeLimit(job_id, time_limit_s, signal)
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._renewing, daemon=True,
                                          name=f"gpuq-lease-{job_id}"),
                         threading.Thread(target=self._watching_redis, daemon=True,
                                          name=f"gpuq-cancel-{job_id}"),
                         threading.Thread(target=self.time_limit.keep, args=(self._done,),
                                          daemon=True, name=f"gpuq-time-{job_id}")]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """End the lease's threads, and wait for them: a refresh of the holds under way
        must not write them again after the attempt released its GPUs, or they would stay
        held, by no job, until they expire."""
        self._done.set()
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout=STOP_JOIN_S)

    def renew(self, session: Session | None = None) -> bool:
        """Renew now, in `session` if given; False when this attempt holds no lease any
        more."""
        started = time.monotonic()
        with contextlib.ExitStack() as stack:
            if session is None:
                session = stack.enter_context(self.rt.session())
            renewed = renew_lease(session, self.job_id, self.attempt,
                                  self.rt.settings.reservation_ttl_s)
        if renewed is None:
            self.superseded = True
            return False
        self.renewed_at = started
        self.time_limit.reread(renewed.state, renewed.started_at, renewed.time_limit_s)
        if renewed.state == JobState.CANCELLING.value:
            self.cancelled = True
        return True

    def stop_reason(self) -> str | None:
        if self.cancelled:
            return CANCEL
        if self.superseded:
            return SUPERSEDED
        if self.time_limit.reached():
            return TIMEOUT
        if shutting_down.is_set():
            return SHUTDOWN
        if time.monotonic() - self.renewed_at > self.rt.settings.lease_stop_s:
            return LEASE
        return None

    def _renewing(self) -> None:
        while not self._done.wait(self.rt.settings.heartbeat_s):
            try:
                self.renew()
            except Exception as e:  # the database is away: the lease runs down meanwhile
                log.warning("job %s: lease not renewed (%s)", self.job_id, e)
            if self.superseded:
                return

    def _watching_redis(self) -> None:
        token = cluster.holder(self.job_id, self.attempt)
        next_refresh = next_sample = 0.0
        while not self._done.wait(CANCEL_POLL_S):
            try:
                if self.rt.redis.exists(keys.cancel(self.job_id)):
                    self.cancelled = True
                if self.gpu_ids and time.monotonic() >= next_refresh:
                    cluster.refresh(self.rt.redis, self.host, self.gpu_ids, token,
                                    self.rt.settings.reservation_ttl_s)
                    next_refresh = time.monotonic() + self.rt.settings.heartbeat_s
                if time.monotonic() >= next_sample:
                    self.figures.sample(self.rt.redis)
                    next_sample = time.monotonic() + self.rt.settings.monitor_interval_s
            except Exception as e:  # Redis is away: the job runs on under its lease
                log.warning("job %s: Redis is away (%s); the job runs on", self.job_id, e)
