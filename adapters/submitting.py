"""The submitting half of a sync: settle what a dead sync left unrecorded, then take,
submit and record what waits, part by part (the steps are in adapters/intent.py)."""

from __future__ import annotations

import base64
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import LockError
from sqlmodel import col, update

from adapters import intent
from adapters.intent import Submission, SubmitRefused, contiguous_parts
from app.core.errors import GpuqError
from app.core.states import JobState
from app.store.models import Job

if TYPE_CHECKING:
    from adapters.base import BatchAdapter

log = logging.getLogger(__name__)


class _StopSubmitting(Exception):
    """This pass submits nothing more: the backend did not answer, or the lock is lost."""


def settle_unrecorded(adapter: BatchAdapter) -> int:
    """Rows taken for submission whose backend id was never recorded (a sync died
    between its backend call and the record, or the call timed out): adopt what the
    backend has under their tag; past `unrecorded_timeout_s`, the rest never reached it."""
    rows = [j for j in adapter.jobs_in(JobState.STARTING, JobState.CANCELLING)
            if not j.backend_id]
    if not rows:
        return 0
    found: dict[tuple[int, int], tuple[int, str]] = {}
    for name, handle in adapter.tagged().items():
        parsed = intent.parse(adapter.install, name)
        if parsed is not None:
            found[parsed[:2]] = (parsed[2], handle)
    adopted, now = 0, time.time()
    cancel: list[str] = []
    for job in rows:
        assert job.id is not None
        if (job.id, job.attempt) not in found:
            continue
        count, handle = found[(job.id, job.attempt)]
        with adapter.rt.session() as session:
            part = intent.part_of(session, job, count)
            ids = adapter.member_ids(handle, count)
            part_ids = [ids[p.rank - job.rank] for p in part]
            cancel += intent.record(session, part, part_ids)
        adopted += len(part)
        log.warning("%s: adopted %s for jobs %s, submitted by a sync that did not record "
                    "it", adapter.backend_name, handle, [p.id for p in part])
    if cancel:
        adapter.cancel(cancel)
    adopted_ids = {j.id for j in adapter.jobs_in(JobState.STARTING, JobState.CANCELLING)
                   if j.backend_id}
    stale = [j for j in rows if j.id not in adopted_ids and
             now - (j.dispatched_at or now) > adapter.unrecorded_timeout_s]
    if stale:
        with adapter.rt.session() as session:
            intent.release(session, stale, f"{adapter.backend_name} never got attempt "
                           f"{stale[0].attempt}; submitting it again", now)
    return adopted + len(stale)


def submit_pending(adapter: BatchAdapter, lock: Any) -> int:
    live = len(adapter.jobs_in(JobState.STARTING, JobState.RUNNING, JobState.CANCELLING))
    room = adapter.max_concurrent_jobs - live
    if room <= 0:
        return 0
    pending = adapter.pending_jobs(room)
    groups: dict[object, list[Job]] = {}
    for job in pending:
        # Replicas of a launch at the same attempt go together, as arrays; a restarted
        # replica (its launch's array long submitted) goes alone or with its likes.
        key = ((job.launch_id, job.attempt, job.restart_count) if job.launch_id is not None
               else ("job", job.id))
        groups.setdefault(key, []).append(job)
    submitted = 0
    for jobs in groups.values():
        try:
            submitted += _submit_group(adapter, jobs, lock)
        except _StopSubmitting:
            break
    return submitted


def _not_yet(adapter: BatchAdapter, jobs: Sequence[Job], why: str) -> None:
    """Jobs that stay PENDING before anything was sent: say why in the queue."""
    log.warning("%s did not take jobs %s: %s", adapter.backend_name, [j.id for j in jobs], why)
    reason = f"not yet submitted to {adapter.backend_name}: {why}"
    with adapter.rt.session() as session:
        session.execute(update(Job).where(
            col(Job.id).in_([j.id for j in jobs]),
            col(Job.reason).is_distinct_from(reason),
            col(Job.state) == JobState.PENDING.value).values(reason=reason))


def _submit_group(adapter: BatchAdapter, jobs: list[Job], lock: Any) -> int:
    """Take the rows, then submit them part by part, recording each part's ids as soon
    as the backend gives them: a failure in one part never resubmits another."""
    try:
        submission = _submission(adapter, jobs)
        limit = max(1, adapter.array_limit())
    except GpuqError as e:  # no payload, or no backend to ask: nothing was sent
        _not_yet(adapter, jobs, str(e))
        return 0
    submitted = 0
    for part in _claimed_parts(adapter, jobs, limit):
        tag = intent.tag(adapter.install, part[0], len(part))
        try:
            handle = adapter.submit(dataclasses.replace(submission, jobs=part, tag=tag))
        except SubmitRefused as e:
            log.warning("%s refused jobs %s: %s", adapter.backend_name,
                        [j.id for j in part], e)
            with adapter.rt.session() as session:
                intent.release(session, part, f"not yet submitted to {adapter.backend_name}: "
                               f"{e}", time.time() + adapter.refused_retry_s)
            continue
        except Exception as e:  # a timeout, a lost connection: it may have been taken
            log.warning("%s may or may not have taken jobs %s (%s): a later sync looks "
                        "them up by tag %s", adapter.backend_name, [j.id for j in part], e, tag)
            raise _StopSubmitting from e
        with adapter.rt.session() as session:
            cancel = intent.record(session, part, adapter.member_ids(handle, len(part)))
        if cancel:  # cancelled while being submitted: stop it now
            adapter.cancel(cancel)
        submitted += len(part)
        try:
            lock.reacquire()
        except LockError as e:
            log.warning("%s: sync lock lost; stopping this pass's submissions",
                        adapter.backend_name)
            raise _StopSubmitting from e
    return submitted


def _claimed_parts(adapter: BatchAdapter, jobs: list[Job], limit: int) -> Iterator[list[Job]]:
    """Each part, taken for submission just before it is submitted: a sync that dies
    leaves the parts it had not reached PENDING."""
    for part in contiguous_parts(jobs, limit):
        with adapter.rt.session() as session:
            claimed = intent.claim(session, part, adapter.backend_name, adapter.rt.settings)
        yield from contiguous_parts(claimed, limit)


def _submission(adapter: BatchAdapter, jobs: list[Job]) -> Submission:
    """What every part of a group is submitted with: the runner's env and payload."""
    first = jobs[0]
    account = adapter.account(first)  # NoRunAccount: it waits, saying why
    data, secrets = adapter.payload_bytes(first)
    if secrets and not adapter.carries_secrets:
        raise GpuqError(f"{adapter.backend_name} cannot pass a job's secrets without writing "
                        "them in plain; cancel it and submit it to another backend")
    # Only a job's first attempt is ever submitted with others, so every job of a group
    # has restarted as often as the first.
    env = {**first.env, "GPUQ_NUM_JOBS": str(first.num_jobs),
           "GPUQ_RESTART_COUNT": str(first.restart_count),
           "GPUQ_LAUNCH_ID": "" if first.launch_id is None else str(first.launch_id)}
    if first.kind == "function" or account is None:
        # (a command's runner writes no envelope: one run as an account needs no place
        # of its own for one)
        env.update(adapter.result_env(first))
    if len(data) <= adapter.inline_limit_bytes:
        env["GPUQ_PAYLOAD"] = base64.b64encode(data).decode()
    else:
        env.update(adapter.payload_env(first.payload_key or f"job-{first.id}", data, first))
    return Submission(jobs, env, first.gpus, first.name or f"gpuq-{first.id}",
                      first.workdir, secrets=secrets, account=account)
