"""The restart policy: one rule for how an attempt's end moves its job.

A local attempt that exited, a job whose worker died, and a batch job its backend reports
ended all go through `decide` (pure) and `apply` (one fenced write). The rule:

- cancelled: CANCELLED;
- stopped at its time limit: TIMEOUT, never restarted (a job that ran out of time would
  run out of it again);
- exit 0 with nothing wrong: SUCCEEDED; exit 0 whose result cannot be kept: FAILED;
- an exit code listed in the job's recover-on codes: restart, without spending the budget;
- any other failure, or a lost attempt, while restarts remain: restart, spending one;
- otherwise FAILED (it exited) or LOST (nobody knows how it ended).

A restart is RECOVERING then PENDING at once, not dispatched before its backoff: 1 s after
the first attempt, doubling with each attempt up to RESTART_BACKOFF_MAX_S, so that a job
that fails at once (or exits with a recover-on code forever) does not spin. The dispatcher
(or a batch adapter's next sync) then starts it again as a new attempt, which sees
GPUQ_RESTART_COUNT.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement
from sqlmodel import Session, col

from app.core.states import JobState
from app.store.jobs import transition
from app.store.models import Job

RESTART_BACKOFF_MAX_S = 300.0


def restart_backoff_s(attempts: int) -> float:
    """How long a job that has run `attempts` times waits before its next attempt."""
    return min(RESTART_BACKOFF_MAX_S, 2.0 ** max(0, min(attempts - 1, 16)))


@dataclass(frozen=True)
class AttemptEnd:
    """How an attempt ended, as whoever watched it saw it."""

    exit_code: int | None = None  # the process's exit code, when one is known
    lost: bool = False  # its worker or backend lost it: how it ended is unknown
    cancelled: bool = False  # it was stopped on a user's request
    timed_out: bool = False  # it was stopped at its time limit (or its backend's)
    why: str | None = None  # what went wrong in words, when there is more to say than a code


def ended_values(job: Job, ended_at: float, exit_code: int | None = None) -> dict[str, Any]:
    """What is recorded of an attempt that ended at `ended_at`."""
    return {"exit_code": exit_code, "ended_at": ended_at, "pid": None, "lease_until": None,
            "runtime_s": job.runtime_s + max(0.0, ended_at - (job.started_at or ended_at))}


@dataclass(frozen=True)
class Decision:
    """Where the policy sends a job: a terminal state, or RECOVERING (a restart)."""

    target: JobState
    reason: str | None
    spends_restart: bool = False  # a restart that counts against max_restarts

    @property
    def restarts(self) -> bool:
        return self.target is JobState.RECOVERING


def decide(restarts: int, max_restarts: int, recover_exit_codes: Sequence[int],
           end: AttemptEnd) -> Decision:
    """The policy's answer for a job that has restarted `restarts` times so far."""
    if end.cancelled:
        return Decision(JobState.CANCELLED, end.why or "cancelled by user")
    if end.timed_out:
        return Decision(JobState.TIMEOUT, end.why or "reached its time limit")
    if end.exit_code == 0 and not end.lost:
        if end.why is None:
            return Decision(JobState.SUCCEEDED, None)
        return Decision(JobState.FAILED, end.why)  # it ran, but its result cannot be kept
    if end.lost:
        why = end.why or "its attempt was lost"
        terminal, final_reason = JobState.LOST, f"{why}; no restart left"
    else:
        why = end.why or (f"exit code {end.exit_code}" if end.exit_code is not None
                          else "failed with no exit code")
        terminal, final_reason = JobState.FAILED, why
        if end.exit_code is not None and end.exit_code in recover_exit_codes:
            return Decision(JobState.RECOVERING, f"{why}; restarting", spends_restart=False)
    if restarts < max_restarts:
        return Decision(JobState.RECOVERING, f"{why}; restarting", spends_restart=True)
    return Decision(terminal, final_reason)


def apply(session: Session, job: Job, end: AttemptEnd, values: dict[str, Any] | None = None,
          only_from: Sequence[JobState] | None = None, attempt: int | None = None,
          where: Sequence[ColumnElement[bool]] = ()) -> JobState | None:
    """Move `job` as the policy says; return where it went, or None when it had moved on
    (a newer attempt, a cancel, another settler first) and nothing was written.

    The write is fenced on `attempt` (the attempt the caller watched; `job.attempt` by
    default). `values` are what the caller records of the ended attempt (end time, exit
    code, runtime). A restart also clears `backend_id`, so that a late poll of the old
    backend job can never be taken for the next attempt's. `where` narrows the write
    further (the reconciler: only while the attempt's lease has run out)."""
    assert job.id is not None
    decision = decide(job.restart_count, job.max_restarts, job.recover_exit_codes, end)
    fence = job.attempt if attempt is None else attempt
    fenced = [col(Job.id) == job.id, col(Job.attempt) == fence, *where]
    if not decision.restarts:
        moved = transition(session, decision.target, decision.reason, fenced, values, only_from)
        return decision.target if moved else None
    restarts = job.restart_count + (1 if decision.spends_restart else 0)
    if not transition(session, JobState.RECOVERING, decision.reason, fenced,
                      {**(values or {}), "restart_count": restarts, "backend_id": None,
                       "not_before": time.time() + restart_backoff_s(fence)},
                      only_from):
        return None
    transition(session, JobState.PENDING, "restart", fenced[:2],
               only_from=[JobState.RECOVERING])
    return JobState.RECOVERING
