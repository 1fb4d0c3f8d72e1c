"""One attempt of a job on the GPUs reserved for it: start, watch, record, release."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import or_
from sqlalchemy.exc import OperationalError
from sqlmodel import col, select
from tenacity import (
    Retrying,
    before_sleep_log,
    retry,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from app.core import keys, logcap
from app.core.accounts import RunAs
from app.core.durations import format_duration
from app.core.errors import NoRunAccount, PayloadError, PayloadNotAuthentic
from app.core.paths import JobPaths
from app.core.procgroup import process_identity
from app.core.security import check_closed_to_jobs
from app.core.states import JobState
from app.runtime import Runtime
from app.store import accounting, cluster, restart_policy, users
from app.store.cluster import holder, release
from app.store.db import begin_writing, riding_out_outages
from app.store.jobs import attempt_is, drop_payload_if_finished, note, transition
from app.store.models import Job
from scheduler.dispatch.allocator import Dispatcher
from scheduler.dispatch.reconcile import record_end
from scheduler.worker import command as calls
from scheduler.worker import containment, executor
from scheduler.worker.figures import Figures
from scheduler.worker.lease import Lease, shutting_down

log = logging.getLogger(__name__)


# In a GPU worker, its heartbeat's wake (tasks/worker_app.py): the pass that follows a job's
# end then runs on the heartbeat's thread, and this thread takes its next message at once.
# Unset (the CPU worker, a test calling run_attempt), the pass runs here.
dispatch_in_background: Callable[[], None] | None = None


def run_attempt(rt: Runtime, job_id: int, attempt: int) -> str:
    """Run attempt `attempt` of a job if it is still wanted; return what became of it."""
    placed: list[tuple[str, list[int]]] = []  # where the claimed attempt holds its GPUs
    try:
        return _claim_and_run(rt, job_id, attempt, placed)
    except Exception as e:
        # Whatever broke here, the job must not stay RUNNING with its GPUs held.
        log.exception("job %s attempt %s: internal error", job_id, attempt)
        with rt.session() as session:
            transition(session, JobState.FAILED, f"gpuq internal error: {e}",
                       attempt_is(job_id, attempt), {"ended_at": time.time()},
                       only_from=[JobState.STARTING, JobState.RUNNING, JobState.CANCELLING])
        raise
    finally:
        _release(rt, job_id, attempt, placed[0] if placed else None)


@riding_out_outages
def _claim(rt: Runtime, job_id: int, attempt: int) -> tuple[Job, Lease] | str:
    """The job and its lease, taken, if this attempt is the one to run; else why it is
    skipped. One transaction: the read, and the renewal that takes the lease."""
    with rt.session() as session:
        job = session.get(Job, job_id)
        if job is None or job.attempt != attempt or job.state != JobState.STARTING.value:
            # A duplicate or stale message: the database says this attempt is not ours.
            state = job.state if job else "missing"
            log.info("job %s attempt %s skipped: it is %s", job_id, attempt, state)
            return f"skipped ({state})"
        lease = Lease(rt, job_id, attempt, job.host or rt.settings.hostname, job.gpu_ids or [],
                      job.time_limit_s, job.signal)
        # The claim: from here on this worker holds the attempt's lease, or it does not run it.
        if not lease.renew(session):
            log.info("job %s attempt %s skipped: its lease is gone", job_id, attempt)
            return "skipped (superseded)"
    return job, lease


def _claim_and_run(rt: Runtime, job_id: int, attempt: int,
                   placed: list[tuple[str, list[int]]]) -> str:
    if shutting_down.is_set():  # delivered after the stop began: leave it to be requeued
        log.info("job %s attempt %s skipped: this worker is shutting down", job_id, attempt)
        return "skipped (shutting down)"
    claimed = _claim(rt, job_id, attempt)
    if isinstance(claimed, str):
        return claimed
    job, lease = claimed
    placed.append((lease.host, lease.gpu_ids))
    lease.start()
    try:
        return _run_leased(rt, job, attempt, lease, lease.host, lease.gpu_ids)
    finally:
        lease.stop()


def _run_leased(rt: Runtime, job: Job, attempt: int, lease: Lease, host: str,
                gpu_ids: list[int]) -> str:
    assert job.id is not None
    job_id, settings = job.id, rt.settings
    path = JobPaths(rt.settings.home, job_id).log
    path.parent.mkdir(parents=True, exist_ok=True)
    logcap.append(path, f"== gpuq: job {job_id} attempt {attempt} on {host} GPUs {gpu_ids}\n"
                  .encode(), settings.log_max_bytes)
    try:
        account = _account(rt, job)
    except NoRunAccount as e:
        log.warning("job %s: %s", job_id, e)
        with rt.session() as session:
            transition(session, JobState.FAILED, str(e), attempt_is(job_id, attempt),
                       {"ended_at": time.time()}, only_from=[JobState.STARTING])
        return JobState.FAILED.value
    try:
        # The secrets come from the payload, unsealed here: never in the job table.
        env = executor.job_environment(job, dict(os.environ), gpu_ids, host,
                                       calls.job_secrets(rt, job))
        command = calls.resolve_command(rt, job)
    except PayloadError as e:
        return _refuse_payload(rt, job_id, attempt, e)
    if job.preflight and not _preflight(rt, job, attempt, env, path):
        return JobState.FAILED_PRECHECK.value
    abandoned = threading.Event()  # set once the runner returned: a start record stops
    try:
        outcome = _runner(rt, job, account)(
            job, command, env, path, grace_s=settings.kill_grace_s,
            kill_wait_s=settings.kill_wait_s, should_stop=lease.stop_reason,
            on_start=lambda pid: _started(rt, lease, job_id, attempt, host, pid, abandoned),
            log_max_bytes=settings.log_max_bytes,
        )
    except OSError as e:
        with rt.session() as session:
            transition(session, JobState.FAILED, f"could not start: {e}",
                       attempt_is(job_id, attempt), {"ended_at": time.time()},
                       only_from=[JobState.STARTING])
        return "failed to start"
    finally:
        abandoned.set()
    if outcome.stopped == executor.SUPERSEDED:
        log.warning("job %s attempt %s: stopped, its attempt was settled elsewhere",
                    job_id, attempt)
        return "stopped (superseded)"
    lease.figures.ended()
    with contextlib.suppress(Exception):  # the readings of the job's last moments
        lease.figures.sample(rt.redis)
    failure = calls.collect_result(rt, job) if job.kind == "function" else None
    state = _record_outcome(rt, job, attempt, outcome, failure,
                            lease.time_limit.time_limit_s)
    _note_figures(rt, job_id, attempt, lease.figures, outcome.usage)
    if JobState(state).terminal:
        with rt.session() as session:
            drop_payload_if_finished(session, rt.redis, job_id, job.launch_id, job.payload_key)
    return state


def _refuse_payload(rt: Runtime, job_id: int, attempt: int, error: PayloadError) -> str:
    """End a job whose payload cannot be used: FAILED when it does not verify with the
    shared secret (someone may have tampered with it), FAILED_PRECHECK when it is gone or
    damaged."""
    target = (JobState.FAILED if isinstance(error, PayloadNotAuthentic)
              else JobState.FAILED_PRECHECK)
    log.warning("job %s: %s", job_id, error)
    with rt.session() as session:
        transition(session, target, str(error), attempt_is(job_id, attempt),
                   {"ended_at": time.time()}, only_from=[JobState.STARTING])
    return target.value


def _account(rt: Runtime, job: Job) -> RunAs | None:
    """The OS account the job runs as: its owner's where this worker runs as root (app/store/
    users.py `run_as`: None for the stack's owner and same-account users); elsewhere the
    worker's own, as only root can run a process as another account. Raises NoRunAccount
    when the job must not run."""
    if os.geteuid() != 0:
        return None
    with rt.session() as session:
        account = users.run_as(session, job.owner)
    if account is not None and job.tmux:
        raise NoRunAccount(f"an attachable (--tmux) job runs only as the stack's own account; "
                           f"{job.owner}'s jobs run as {account.name}: submit it without --tmux")
    if account is not None:
        check_closed_to_jobs(rt.settings, job.owner, account.name)
    return account


def _runner(rt: Runtime, job: Job, account: RunAs | None) -> Callable[..., executor.Outcome]:
    """The direct executor, or the tmux one for attachable jobs, in a container of the
    attempt's own; the direct one as the job's account."""
    assert job.id is not None
    container = containment.contain(job.id, job.attempt, rt.settings.hostname)
    if not job.tmux:
        return functools.partial(executor.run, account=account, container=container)
    from scheduler.worker import tmux
    return functools.partial(tmux.run, socket=rt.settings.tmux_socket,
                             paths=JobPaths(rt.settings.home, job.id), container=container)


def _preflight(rt: Runtime, job: Job, attempt: int, env: dict[str, str], path: Path) -> bool:
    """Run the job's preflight on its GPUs; False when the job must not run."""
    from scheduler.worker.preflight import run_check

    assert job.id is not None and job.preflight is not None
    result = run_check(rt.settings, job.preflight, env)
    logcap.append(path, f"== gpuq: {result.reason}\n{result.output}".encode(errors="replace"),
                  rt.settings.log_max_bytes)
    with rt.session() as session:
        if result.status == "failed":
            transition(session, JobState.FAILED_PRECHECK, result.reason,
                       attempt_is(job.id, attempt), {"ended_at": time.time()},
                       only_from=[JobState.STARTING])
            return False
        note(session, job.id, result.reason)
    return True


def _started(rt: Runtime, lease: Lease, job_id: int, attempt: int, host: str, pid: int,
             abandoned: threading.Event) -> bool:
    running = _mark_running(rt, lease, job_id, attempt, host, pid, abandoned)
    if running:
        lease.figures.began(pid)
    return running


def _mark_running(rt: Runtime, lease: Lease, job_id: int, attempt: int, host: str, pid: int,
                  abandoned: threading.Event) -> bool:
    """STARTING -> RUNNING with its process id, in one write fenced on the attempt and its
    lease; False if it was cancelled or superseded meanwhile, or its lease ran out (the
    executor then stops what it started).

    A database that is away is retried only while the job may run: the executor watches
    the lease meanwhile (executor.watched_start) and stops the job before the lease runs out,
    and a record made after that would be of a job that is gone."""
    past_the_budget = stop_after_delay(rt.settings.database_retry_s)
    retrying = Retrying(
        retry=retry_if_exception_type(OperationalError),
        wait=wait_exponential(multiplier=0.1, max=2),
        stop=lambda state: (abandoned.is_set() or lease.stop_reason() is not None
                            or past_the_budget(state)),
        before_sleep=before_sleep_log(log, logging.WARNING), reraise=True)
    for tried in retrying:
        with tried, rt.session() as session:
            # The time the lease is checked against is read once the write may go ahead
            # (on SQLite, with its write lock held), not before a wait for the database.
            begin_writing(session.connection())
            if abandoned.is_set():
                return False
            now = time.time()
            running = bool(transition(
                session, JobState.RUNNING, None,
                [*attempt_is(job_id, attempt),
                 or_(col(Job.lease_until).is_(None), col(Job.lease_until) >= now)],
                {"started_at": now, "host": host, "pid": pid,
                 "pid_identity": process_identity(pid)},
                only_from=[JobState.STARTING]))
            if running:  # its time limit counts from here (committed as this returns)
                lease.time_limit.began(pid, now)
            return running
    raise AssertionError("unreachable: tenacity returns or raises")


# An attempt's end is worth waiting for: while it is not recorded its job stays RUNNING in
# the database and its GPUs held there, so nothing else is handed them. The wait ends only
# when the worker shuts down; the reconciler then settles the attempt once its lease ran out.
until_recorded = retry(
    retry=retry_if_exception_type(OperationalError),
    wait=wait_exponential(multiplier=0.1, max=5),
    stop=lambda _: shutting_down.is_set(),
    before_sleep=before_sleep_log(log, logging.WARNING),
    reraise=True,
)

# How an end that gpuq itself brought about is recorded (besides a user's cancel).
_STOPPED_WHY = {
    executor.LEASE: "its worker could not renew its lease (database or network away)",
    executor.SHUTDOWN: "its worker was shut down",
}


def _attempt_end(outcome: executor.Outcome, failure: str | None,
                 time_limit_s: int | None = None) -> restart_policy.AttemptEnd:
    if outcome.stopped == executor.TIMEOUT:
        limit = format_duration(time_limit_s) if time_limit_s else "its limit"
        return restart_policy.AttemptEnd(exit_code=outcome.exit_code, timed_out=True,
                                         why=f"reached its time limit of {limit}")
    stopped_why = _STOPPED_WHY.get(outcome.stopped or "")
    return restart_policy.AttemptEnd(
        exit_code=None if stopped_why else outcome.exit_code, cancelled=outcome.cancelled,
        lost=stopped_why is not None and not outcome.cancelled, why=stopped_why or failure)


def _record_outcome(rt: Runtime, job: Job, attempt: int, outcome: executor.Outcome,
                    failure: str | None = None, time_limit_s: int | None = None) -> str:
    """Record how the attempt ended and apply the restart policy; `failure` explains a
    function job's failure. Fenced on the attempt: a stale attempt writes nothing.

    The outcome is kept in Redis first: if the database is away until this attempt's lease
    runs out, the reconciler records it from there instead of calling the attempt lost."""
    assert job.id is not None
    end, ended_at = _attempt_end(outcome, failure, time_limit_s), time.time()
    with contextlib.suppress(Exception):
        cluster.keep_outcome(rt.redis, job.id, attempt, {
            "end": dataclasses.asdict(end), "ended_at": ended_at,
            "exit_code": outcome.exit_code})
    state = _write_outcome(rt, job.id, attempt, end, ended_at, outcome.exit_code)
    with contextlib.suppress(Exception):
        cluster.forget_outcome(rt.redis, job.id, attempt)
        if end.cancelled or state == JobState.CANCELLED.value:
            rt.redis.delete(keys.cancel(job.id))  # else a flag left behind expires unread
    return state


@until_recorded
def _write_outcome(rt: Runtime, job_id: int, attempt: int, end: restart_policy.AttemptEnd,
                   ended_at: float, exit_code: int) -> str:
    with rt.session() as session:
        current = session.get(Job, job_id)
        assert current is not None
        if current.attempt != attempt:
            return current.state
        if current.state == JobState.STARTING.value and end.lost:
            # Stopped before its start was recorded (its lease ran out meanwhile, or its
            # worker shut down): queued again without spending a restart, as the reconciler
            # does with such an attempt, whichever of the two comes first.
            requeued = transition(session, JobState.PENDING,
                                  f"{end.why}, before its start was recorded; queued again",
                                  attempt_is(job_id, attempt), {"lease_until": None},
                                  only_from=[JobState.STARTING])
            return JobState.PENDING.value if requeued else current.state
        return record_end(session, current, end, ended_at, exit_code) or current.state


def _note_figures(rt: Runtime, job_id: int, attempt: int, figures: Figures,
                  usage: containment.Usage | None) -> None:
    """Add the attempt's GPU figures, and the CPU and memory its container read, to its
    record, which the transition that ended it wrote. Figures are worth less than the
    outcome: one failed write is logged, not retried."""
    peak_mb, util_pct = figures.result()
    if (peak_mb, util_pct, usage) == (None, None, None):
        return
    try:
        with rt.session() as session:
            accounting.note_figures(
                session, job_id, attempt, peak_memory_mb=peak_mb, mean_utilization_pct=util_pct,
                cpu_s=usage.cpu_s if usage else None,
                peak_host_memory_mb=usage.peak_memory_mb if usage else None)
    except Exception as e:
        log.warning("job %s attempt %s: figures not recorded (%s)", job_id, attempt, e)


@riding_out_outages
def _release(rt: Runtime, job_id: int, attempt: int,
             placed: tuple[str, list[int]] | None) -> None:
    """Hand the job's GPUs back and let the dispatcher give them out again. Redis away
    here costs nothing but time: the reservation expires by itself. `placed` is where the
    claimed attempt ran; an attempt not claimed here is looked up."""
    if placed is None:
        with rt.session() as session:
            row = session.exec(select(Job.host, Job.gpu_ids).where(
                *attempt_is(job_id, attempt))).first()
        placed = (row[0], list(row[1])) if row is not None and row[0] and row[1] else None
    try:
        if placed is not None and placed[1]:
            release(rt.redis, placed[0], placed[1], holder(job_id, attempt))
        wake = dispatch_in_background
        if wake is None:
            Dispatcher(rt).dispatch()
        else:  # flagged first: if this process dies now, any GPU worker's heartbeat serves it
            rt.redis.set(keys.DISPATCH_DIRTY, 1)
            wake()
    except Exception as e:
        log.warning("job %s attempt %s: GPUs not released in Redis (%s); they expire", job_id,
                    attempt, e)
