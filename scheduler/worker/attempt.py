"""One attempt of a job on the GPUs reserved for it: start, watch, record, release."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlmodel import col, select

from app.core import keys
from app.core.errors import BrokerUnavailable, PayloadError, PayloadNotAuthentic
from app.core.paths import JobPaths
from app.core.states import JobState
from app.runtime import Runtime
from app.store import restart_policy
from app.store.cluster import holder, refresh, release
from app.store.db import riding_out_outages
from app.store.jobs import drop_payload_if_finished, move, note, transition
from app.store.models import Job
from scheduler.dispatch.allocator import Dispatcher
from scheduler.worker import command as calls
from scheduler.worker import executor

log = logging.getLogger(__name__)
T = TypeVar("T")


def run_attempt(rt: Runtime, job_id: int, attempt: int) -> str:
    """Run attempt `attempt` of a job if it is still wanted; return what became of it."""
    try:
        return _claim_and_run(rt, job_id, attempt)
    except Exception as e:
        # Whatever broke here, the job must not stay RUNNING with its GPUs held.
        log.exception("job %s attempt %s: internal error", job_id, attempt)
        with rt.session() as session:
            transition(session, JobState.FAILED, f"gpuq internal error: {e}",
                       [col(Job.id) == job_id], {"ended_at": time.time()},
                       only_from=[JobState.STARTING, JobState.RUNNING, JobState.CANCELLING])
        raise
    finally:
        _release(rt, job_id, attempt)


@riding_out_outages
def _claim(rt: Runtime, job_id: int, attempt: int) -> Job | str:
    """The job, if this attempt is the one to run; else why it is skipped."""
    with rt.session() as session:
        job = session.get(Job, job_id)
    if job is None or job.attempt != attempt or job.state != JobState.STARTING.value:
        # A duplicate or stale message: the database says this attempt is not ours to run.
        state = job.state if job else "missing"
        log.info("job %s attempt %s skipped: it is %s", job_id, attempt, state)
        return f"skipped ({state})"
    return job


def _claim_and_run(rt: Runtime, job_id: int, attempt: int) -> str:
    settings = rt.settings
    job = _claim(rt, job_id, attempt)
    if isinstance(job, str):
        return job
    host = job.host or settings.hostname
    gpu_ids = job.gpu_ids or []
    env = executor.job_environment(job, dict(os.environ), gpu_ids, host)
    path = JobPaths(rt.settings.home, job_id).log
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(f"== gpuq: job {job_id} attempt {attempt} on {host} GPUs {gpu_ids}\n".encode())
    try:
        env.update(calls.job_secrets(rt, job))  # from the payload: never in the job table
        command = calls.resolve_command(rt, job)
    except PayloadError as e:
        return _refuse_payload(rt, job_id, e)
    if job.preflight and not _preflight(rt, job, env, path):
        return JobState.FAILED_PRECHECK.value
    try:
        outcome = _runner(rt, job)(
            job, command, env, path, grace_s=settings.kill_grace_s,
            cancel_requested=_outliving_outages(
                lambda: bool(rt.redis.exists(keys.cancel(job_id))), False, job_id),
            on_start=lambda pid: _mark_running(rt, job_id, host, pid),
            heartbeat=_outliving_outages(
                lambda: refresh(rt.redis, host, gpu_ids, holder(job_id, attempt),
                                settings.reservation_ttl_s), None, job_id),
            heartbeat_s=settings.heartbeat_s,
        )
    except OSError as e:
        with rt.session() as session:
            move(session, job_id, JobState.FAILED, f"could not start: {e}",
                 {"ended_at": time.time()})
        return "failed to start"
    failure = calls.collect_result(rt, job) if job.kind == "function" else None
    state = _record_outcome(rt, job, outcome, failure)
    if JobState(state).terminal:
        with rt.session() as session:
            drop_payload_if_finished(session, rt.redis, job_id, job.launch_id, job.payload_key)
    return state


def _outliving_outages(call: Callable[[], T], fallback: T, job_id: int) -> Callable[[], T]:
    """A call the watch loop makes every round, answering `fallback` while Redis is away.

    The job's process does not need the broker: an outage longer than the client's own
    reconnecting must not end the watch (and fail a job that is running fine). The loop
    asks again on its next round; a reservation not refreshed meanwhile is taken back by
    the reconciler only when the worker's heartbeat has stopped too."""
    import redis

    def guarded() -> T:
        try:
            return call()
        except (redis.RedisError, OSError, BrokerUnavailable) as e:
            log.warning("job %s: Redis is away (%s); the job runs on", job_id, e)
            return fallback

    return guarded


def _refuse_payload(rt: Runtime, job_id: int, error: PayloadError) -> str:
    """End a job whose payload cannot be used: FAILED when it does not verify with the
    shared secret (someone may have tampered with it), FAILED_PRECHECK when it is gone or
    damaged."""
    target = (JobState.FAILED if isinstance(error, PayloadNotAuthentic)
              else JobState.FAILED_PRECHECK)
    log.warning("job %s: %s", job_id, error)
    with rt.session() as session:
        transition(session, target, str(error), [col(Job.id) == job_id],
                   {"ended_at": time.time()}, only_from=[JobState.STARTING])
    return target.value


def _runner(rt: Runtime, job: Job) -> Callable[..., executor.Outcome]:
    """The direct executor, or the tmux one for attachable jobs."""
    if not job.tmux:
        return executor.run
    from scheduler.worker import tmux
    assert job.id is not None
    return functools.partial(tmux.run, socket=rt.settings.tmux_socket,
                             paths=JobPaths(rt.settings.home, job.id))


def _preflight(rt: Runtime, job: Job, env: dict[str, str], path: Path) -> bool:
    """Run the job's preflight on its GPUs; False when the job must not run."""
    from scheduler.worker.preflight import run_check

    assert job.id is not None and job.preflight is not None
    result = run_check(rt.settings, job.preflight, env)
    with open(path, "a") as log_file:
        log_file.write(f"== gpuq: {result.reason}\n{result.output}")
    with rt.session() as session:
        if result.status == "failed":
            transition(session, JobState.FAILED_PRECHECK, result.reason, [col(Job.id) == job.id],
                       {"ended_at": time.time()}, only_from=[JobState.STARTING])
            return False
        note(session, job.id, result.reason)
    return True


@riding_out_outages
def _mark_running(rt: Runtime, job_id: int, host: str, pid: int) -> bool:
    """STARTING -> RUNNING with its process id, in one write; False if it was cancelled
    meanwhile (the executor then stops the process it just started)."""
    with rt.session() as session:
        return bool(transition(session, JobState.RUNNING, None, [col(Job.id) == job_id],
                               {"started_at": time.time(), "host": host, "pid": pid},
                               only_from=[JobState.STARTING]))


@riding_out_outages
def _record_outcome(rt: Runtime, job: Job, outcome: executor.Outcome,
                    failure: str | None = None) -> str:
    """Record how the attempt ended and apply the restart policy; `failure` explains a
    function job's failure."""
    assert job.id is not None
    now = time.time()
    with rt.session() as session:
        current = session.get(Job, job.id)
        assert current is not None
        runtime_s = current.runtime_s + now - (current.started_at or now)
        ended = {"exit_code": outcome.exit_code, "ended_at": now, "runtime_s": runtime_s,
                 "pid": None}
        cancelled = outcome.cancelled or current.state == JobState.CANCELLING.value
        if cancelled:
            rt.redis.delete(keys.cancel(job.id))
        end = restart_policy.AttemptEnd(exit_code=outcome.exit_code, cancelled=cancelled,
                                        why=failure)
        # One UPDATE from the state it was read in, fenced on the attempt this worker ran.
        moved = restart_policy.apply(session, current, end, ended,
                                     only_from=[JobState(current.state)], attempt=job.attempt)
        return (moved or JobState(current.state)).value


@riding_out_outages
def _release(rt: Runtime, job_id: int, attempt: int) -> None:
    """Hand the job's GPUs back and let the dispatcher give them out again."""
    with rt.session() as session:
        placed = session.exec(select(Job.host, Job.gpu_ids).where(
            col(Job.id) == job_id, col(Job.attempt) == attempt)).first()
    if placed is not None and placed[0] and placed[1]:
        release(rt.redis, placed[0], placed[1], holder(job_id, attempt))
    Dispatcher(rt).dispatch()
