"""An attempt's time limit on its worker: when it is reached, and the warning signal before.

The limit (`--time`) counts from the attempt's recorded start (`started_at`, written as it
became RUNNING), so that each attempt has the whole of it. The lease's renewals read it
again every heartbeat (`reread`): `gpuq update --time` moves it on a running job. The
executor's loop asks `reached()` and stops the job (SIGTERM to its group, SIGKILL after
GPUQ_KILL_WAIT_S, then its container emptied); the job ends TIMEOUT. `keep` runs on a thread
of its own and sends `--signal` SIG@SECONDS to the job's process group once, SECONDS before
the limit (at once when the limit is shorter than that), so that the job can save its work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from app.core.durations import signal_number
from app.core.states import JobState

log = logging.getLogger(__name__)

TICK_S = 0.1
# A recorded start counts for the attempt that holds the lease only in these states: a row
# still STARTING may hold the start of the attempt before.
_RUNNING = (JobState.RUNNING.value, JobState.CANCELLING.value)


class TimeLimit:
    def __init__(self, job_id: int, time_limit_s: int | None, signal: str | None) -> None:
        self.job_id = job_id
        self.time_limit_s = time_limit_s
        self.started_at: float | None = None
        self.pgid: int | None = None
        self.signal = signal_number(signal) if signal else None  # (number, lead in seconds)
        self.signalled = False
        self._lock = threading.Lock()

    @property
    def deadline(self) -> float | None:
        """When the attempt reaches its limit (UTC epoch seconds); None without one, or
        before its start is recorded."""
        if self.time_limit_s is None or self.started_at is None:
            return None
        return self.started_at + self.time_limit_s

    def began(self, pgid: int, started_at: float) -> None:
        """The job's process group runs, its start recorded at `started_at`."""
        self.pgid, self.started_at = pgid, started_at

    def reread(self, state: str, started_at: float | None, time_limit_s: int | None) -> None:
        """What a renewal read of the job's row."""
        self.time_limit_s = time_limit_s
        if state in _RUNNING and started_at is not None:
            self.started_at = started_at

    def reached(self, now: float | None = None) -> bool:
        deadline = self.deadline
        return deadline is not None and (time.time() if now is None else now) >= deadline

    def signal_due(self, now: float | None = None) -> int | None:
        """The signal to send now, once; None when none is due (or it was sent)."""
        deadline = self.deadline
        if self.signal is None or self.signalled or deadline is None or self.pgid is None:
            return None
        number, lead_s = self.signal
        return number if (time.time() if now is None else now) >= deadline - lead_s else None

    def keep(self, done: threading.Event) -> None:
        """Send the warning signal when it is due, until `done` (the attempt ended). A job
        without --signal has nothing to send (the signal is fixed at submission)."""
        if self.signal is None:
            return
        while not done.wait(TICK_S):
            with self._lock:
                number = self.signal_due()
                if number is None or done.is_set():
                    continue
                self.signalled = True
            assert self.pgid is not None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, number)
            log.info("job %s: sent signal %s to its process group, %ss before its time limit",
                     self.job_id, number, self.signal[1] if self.signal else "?")
