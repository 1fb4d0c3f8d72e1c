"""Job states and the moves allowed between them."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    PENDING = "PENDING"  # accepted, waiting for GPUs; cancellable at once
    STARTING = "STARTING"  # GPUs reserved, message on the GPU's queue, process not yet up
    RUNNING = "RUNNING"  # the process runs
    SUCCEEDED = "SUCCEEDED"  # exited 0
    FAILED = "FAILED"  # exited non-zero with no restart left, or could not start
    CANCELLING = "CANCELLING"  # a cancel reached a running job; its process group is stopping
    CANCELLED = "CANCELLED"  # cancelled by a user
    RECOVERING = "RECOVERING"  # an attempt failed or was lost; a restart is on its way
    FAILED_PRECHECK = "FAILED_PRECHECK"  # bad spec or failed preflight
    FAILED_NO_RESOURCE = "FAILED_NO_RESOURCE"  # asks for more GPUs than any host has
    LOST = "LOST"  # its worker died and no restart was left
    TIMEOUT = "TIMEOUT"  # stopped at its time limit (--time); never restarted
    UNKNOWN = "UNKNOWN"  # its state cannot be known; never a guess

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset(
    {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.FAILED_PRECHECK,
        JobState.FAILED_NO_RESOURCE,
        JobState.LOST,
        JobState.TIMEOUT,
    }
)

ACTIVE = frozenset(JobState) - TERMINAL

S = JobState
ALLOWED: dict[JobState, frozenset[JobState]] = {
    S.PENDING: frozenset(
        {S.STARTING, S.CANCELLED, S.FAILED_PRECHECK, S.FAILED_NO_RESOURCE, S.UNKNOWN}
    ),
    # STARTING -> PENDING: the reservation or the message was lost before the process started.
    # STARTING -> CANCELLING: a batch job already at its backend is cancelled there.
    # STARTING -> TIMEOUT: a batch job whose backend reports its time-out before gpuq saw
    # it run.
    S.STARTING: frozenset(
        {S.RUNNING, S.PENDING, S.CANCELLING, S.CANCELLED, S.FAILED, S.FAILED_PRECHECK,
         S.RECOVERING, S.LOST, S.TIMEOUT, S.UNKNOWN}
    ),
    S.RUNNING: frozenset(
        {S.SUCCEEDED, S.FAILED, S.CANCELLING, S.RECOVERING, S.LOST, S.TIMEOUT, S.UNKNOWN}
    ),
    # A job may finish on its own (or reach its time limit) while its cancel is in flight.
    S.CANCELLING: frozenset({S.CANCELLED, S.SUCCEEDED, S.FAILED, S.LOST, S.TIMEOUT,
                             S.UNKNOWN}),
    S.RECOVERING: frozenset({S.PENDING, S.CANCELLED, S.FAILED, S.UNKNOWN}),
    S.UNKNOWN: frozenset(
        {S.PENDING, S.RUNNING, S.SUCCEEDED, S.FAILED, S.CANCELLED, S.RECOVERING, S.LOST,
         S.TIMEOUT}
    ),
}
for _terminal in TERMINAL:
    ALLOWED[_terminal] = frozenset()


def can_move(source: JobState, target: JobState) -> bool:
    return target in ALLOWED[source]


def sources_of(target: JobState) -> list[JobState]:
    """States from which `target` may be reached, in a stable order."""
    return [state for state in JobState if target in ALLOWED[state]]


class EtaBasis(StrEnum):
    """What a PENDING job's expected start (`eta`) rests on."""

    RESERVATION = "reservation"  # its reservation: when its GPUs' holders end by their limits
    LIMITS = "limits"  # the running jobs' limits, without a reservation of its own
    SIBLINGS = "siblings"  # how long finished jobs of its launch (or name) ran
    UNKNOWN = "unknown"  # a job on its GPUs has no limit, or no pass reached it yet
