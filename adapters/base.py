"""The batch adapter contract: a Celery Task subclass per backend.

A backend implements these calls and nothing else:

    submit(submission) -> handle         one job, or one part of a launch as one array,
                                         under the submission's tag; raises SubmitRefused
                                         when the backend surely took nothing
                                         (a backend with carries_secrets delivers
                                         submission.secrets through its own secret
                                         store, never in env, payload or files)
    member_ids(handle, count)            the backend ids of a submission's replicas
    tagged() -> {tag: handle}            what this installation submitted, by tag
    poll(backend_ids) -> {id: Status}    one batched call for every live job
    cancel(backend_ids)

The base owns the rest: packing the payload (inline below `inline_limit_bytes`, else a file
in the backend's store), the concurrency limit, batched polling with backoff, mapping
backend states onto job states, routing function results and errors into the job record,
failing jobs stuck pending (with the backend's reason), and applying the restart policy
(app/store/restart_policy.py) to a job that failed or that the backend no longer knows
(after a grace period): a restart is resubmitted on its own by a later pass. One `sync`
pass does all of it; beat runs it, and a submit or a cancel asks for one at once.

Submitting is idempotent. One sync runs at a time per backend (a Redis lock outliving any
sync); should two run anyway (the lock lost with Redis), the database fences them: a row is
taken for submission by a conditional PENDING -> STARTING move before the backend call
(adapters/intent.py), and its backend id recorded part by part after it. A row left
STARTING without a backend id (its sync died, or the call timed out) is looked up by its
tag and adopted; one the backend still does not know after `unrecorded_timeout_s` waits
again (CANCELLING: ends CANCELLED). A cancel that lands between the two writes finds the
row STARTING, makes it CANCELLING, and the sync cancels the backend job as soon as it
records its id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cloudpickle
from celery import Task
from redis.exceptions import LockError
from sqlmodel import col, select

from adapters import intent, submitting
from adapters.intent import Submission, SubmitRefused, contiguous_parts
from app.core import keys, results, sealing
from app.core.accounts import RunAs
from app.core.errors import GpuqError
from app.core.paths import (
    BatchStore,
    JobPaths,
    NotOwned,
    account_area,
    area_results,
    give_file,
    open_owned,
    passage,
    remove_owned,
    unreachable_by_others,
)
from app.core.security import check_closed_to_jobs
from app.core.settings import Settings
from app.core.states import JobState
from app.runtime import Runtime
from app.store import payload_store, restart_policy, users
from app.store.jobs import batch_pending, transition
from app.store.models import Job

log = logging.getLogger(__name__)
__all__ = ["BatchAdapter", "Status", "Submission", "SubmitRefused", "contiguous_parts"]


@dataclass
class Status:
    """What a backend says of one job."""

    state: str  # pending | running | succeeded | failed | timeout | cancelled | missing
    reason: str | None = None
    exit_code: int | None = None


def _attempt_end(job: Job, status: Status, failure: str | None) -> restart_policy.AttemptEnd:
    """An ended backend status as the restart policy reads it; `failure` is why a function
    job failed, from its envelope."""
    if status.state == "cancelled" or job.state == JobState.CANCELLING.value:
        return restart_policy.AttemptEnd(cancelled=True, why=status.reason)
    if status.state == "succeeded":
        return restart_policy.AttemptEnd(exit_code=0, why=failure)
    if status.state == "timeout":  # stopped at its time limit: TIMEOUT, never restarted
        return restart_policy.AttemptEnd(exit_code=status.exit_code, timed_out=True,
                                         why=status.reason)
    # A failure whose exit code says nothing (0 after NODE_FAIL, or none at all) is still a
    # failure: it is judged with no exit code rather than taken for a success.
    return restart_policy.AttemptEnd(exit_code=status.exit_code or None,
                                     why=failure or status.reason)


class BatchAdapter(Task):  # type: ignore[misc]
    """Base of every batch backend; subclasses set `backend_name` (not `backend`, which is
    Celery's result backend on every Task) and the three calls."""

    backend_name: ClassVar[str] = ""
    max_concurrent_jobs: int = 1000
    inline_limit_bytes: int = 32 * 1024
    pending_timeout_s: float = 3600.0
    vanished_grace_s: float = 60.0
    # Longer than any sync (each backend call is bounded by call_timeout_s, and the lock
    # is renewed after each), so that a live sync never loses it.
    sync_lock_s: float = 300.0
    call_timeout_s: float = 60.0
    # A row taken for submission whose backend job is not found this long after: taken to
    # have never reached the backend. Past call_timeout_s, so that a call left running by
    # a dead sync has ended by then.
    unrecorded_timeout_s: float = 300.0
    refused_retry_s: float = 10.0  # a refused submission is tried again after this
    # Whether submit() delivers Submission.secrets through the backend's own secret store
    # (or the runner's environment), never in plain: a backend that does not is never
    # handed a job with secrets.
    carries_secrets: ClassVar[bool] = False
    rt: Runtime

    # -- the contract -----------------------------------------------------------------
    def submit(self, submission: Submission) -> str:
        """Submit one part (ranks in a row, at most array_limit()) under submission.tag;
        return its handle. Raise SubmitRefused only when the backend surely took nothing."""
        raise NotImplementedError

    def member_ids(self, handle: str, count: int) -> list[str]:
        """The backend ids of the `count` replicas of the submission `handle`, by index."""
        raise NotImplementedError

    def tagged(self) -> dict[str, str]:
        """Every submission of this installation the backend knows: tag -> handle."""
        raise NotImplementedError

    def array_limit(self) -> int:
        """The most replicas one submission may hold."""
        return 1

    def poll(self, backend_ids: Sequence[str]) -> dict[str, Status]:
        raise NotImplementedError

    def cancel(self, backend_ids: Sequence[str]) -> None:
        raise NotImplementedError

    @classmethod
    def store_dir(cls, settings: Settings) -> Path:
        """Where payloads, results and output files live when they are files: a directory
        that the backend's nodes see (gpuq's home by default)."""
        return settings.home / "batch"

    @classmethod
    def output(cls, settings: Settings, job: Job) -> tuple[Path | None, str | None]:
        """Where a job's output is: a file gpuq can read, or else words saying where."""
        assert job.id is not None
        return JobPaths(settings.home, job.id).log, None

    def payload_env(self, key: str, data: bytes, job: Job) -> dict[str, str]:
        """Where a payload too large to pass inline goes: a file in the store directory (in
        the account's area for a job that runs as its owner's account); object-store
        backends override this."""
        name = key.replace(":", "_")
        if (account := self.account(job)) is not None:
            area = self.area(job, account)
            return {"GPUQ_PAYLOAD_FILE": str(give_file(area, f"payload.{name}", data,
                                                       account.uid, account.gid))}
        path = BatchStore(self.store_dir(self.rt.settings)).payload(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, data)
        return {"GPUQ_PAYLOAD_FILE": str(path)}

    def result_env(self, job: Job) -> dict[str, str]:
        """Where the runner writes envelopes: a directory by default."""
        return {"GPUQ_RESULT_DIR": str(self.result_dir(job))}

    def read_result(self, job: Job) -> bytes | None:
        """The envelope a function job's runner wrote, if any: in its owner's area (only a
        plain file of the area's account), else in the store."""
        assert job.id is not None
        try:
            with open_owned(self.users_dir() / job.owner, _results_name(job),
                            f"{job.rank}.pkl") as f:
                return f.read()
        except FileNotFoundError:
            pass
        except NotOwned as e:  # what its account put there in the envelope's place
            log.warning("job %s: no result read: %s", job.id, e)
            return None
        path = BatchStore(self.store_dir(self.rt.settings)).result(job.launch_id, job.id, job.rank)
        return path.read_bytes() if path.exists() else None

    def forget_result(self, job: Job) -> None:
        """Drop the envelope of an attempt that is being restarted, so that the next
        attempt's end is never read from the previous one's."""
        assert job.id is not None
        remove_owned(self.users_dir() / job.owner, _results_name(job), f"{job.rank}.pkl")
        BatchStore(self.store_dir(self.rt.settings)).result(job.launch_id, job.id,
                                                            job.rank).unlink(missing_ok=True)

    # -- jobs that run as their owner's OS account ----------------------------------------
    # Whether this backend runs a named user's job as that user's OS account where the
    # stack runs as root (app/store/users.py `run_as`); a backend that cannot runs every
    # job as the stack's account.
    runs_as_owner: ClassVar[bool] = False
    # What to do where the accounts cannot reach the store (said after the reason).
    area_fix: ClassVar[str] = "let other accounts pass through it (chmod o+x)"

    def account(self, job: Job) -> RunAs | None:
        """The OS account `job` runs as on the backend, or None for the stack's own.
        Raises NoRunAccount for a job that must not run (its owner revoked, say)."""
        if not self.runs_as_owner or os.geteuid() != 0:
            return None
        # Looked up once an owner a pass: a submission asks for its result folder and
        # payload file too, and a pass may submit several launches of one owner.
        looked_up: dict[str, RunAs | None] = self.__dict__.setdefault("_accounts", {})
        if job.owner not in looked_up:
            account = users.run_as(self.rt.engine, job.owner)
            if account is not None:
                check_closed_to_jobs(self.rt.settings, job.owner, account.name)
            looked_up[job.owner] = account
        return looked_up[job.owner]

    def users_dir(self) -> Path:
        """Where the accounts' areas are: `<store>/users/<user>/`."""
        return self.store_dir(self.rt.settings) / "users"

    def area(self, job: Job, account: RunAs) -> Path:
        """The area of `job`'s owner (app/core/paths.py), made: where the job's runner,
        running as `account`, finds its files and leaves its output and result."""
        store = passage(self.store_dir(self.rt.settings))
        if (closed := unreachable_by_others(store)) is not None:
            raise GpuqError(f"{self.backend_name} runs {job.owner}'s jobs as the OS account "
                            f"{account.name}, who cannot pass through {closed}: "
                            f"{self.area_fix}")
        return account_area(self.users_dir(), job.owner, account.uid, account.gid)

    # -- the base's work ----------------------------------------------------------------
    poll_interval_s: float = 2.0
    max_poll_interval_s: float = 60.0

    def run(self, action: str = "sync") -> dict[str, int]:
        """`sync` when its backed-off turn has come (beat); `sync-now` at once (a submit)."""
        if action not in ("sync", "sync-now"):
            raise ValueError(f"unknown action {action!r}; use 'sync' or 'sync-now'")
        key = keys.batch_poll(self.backend_name)
        r = self.rt.redis
        stored: list[Any] = list(r.hmget(key, "next_at", "interval_s"))  # type: ignore[arg-type]
        next_at = float(stored[0] or 0)
        interval = float(stored[1] or self.poll_interval_s)
        if action == "sync" and time.time() < next_at:
            return {"skipped": 1}
        done = self.sync()
        if "skipped" in done:
            return done
        # Nothing changed: poll less often, up to a ceiling; any change resets the pace.
        interval = (self.poll_interval_s if any(done.values())
                    else min(interval * 2, self.max_poll_interval_s))
        r.hset(key, mapping={"next_at": time.time() + interval, "interval_s": interval})
        return done

    def result_dir(self, job: Job) -> Path:
        assert job.id is not None
        if (account := self.account(job)) is not None:
            return self.area(job, account) / _results_name(job)
        return BatchStore(self.store_dir(self.rt.settings)).results(job.launch_id, job.id)

    @property
    def install(self) -> str:
        return intent.install_id(self.rt.settings)

    def sync(self) -> dict[str, int]:
        """Cancel what was asked, poll what lives, settle what a dead sync left, submit what
        waits (within the limit). One at a time per backend: a sync asked for while another
        runs is left to that one, which passes again."""
        r = self.rt.redis
        again = keys.batch_sync_again(self.backend_name)
        lock = r.lock(keys.batch_sync_lock(self.backend_name), timeout=self.sync_lock_s,
                      blocking=False, thread_local=False)
        if not lock.acquire():
            r.set(again, 1, ex=int(self.sync_lock_s))
            return {"skipped": 1}
        try:
            done = {"cancelled": 0, "moved": 0, "adopted": 0, "submitted": 0}
            for _ in range(3):  # bounded: a stream of nudges must not hold the lock forever
                r.delete(again)
                for name, count in self._pass(lock).items():
                    done[name] += count
                if not r.exists(again):
                    break
            return done
        finally:
            with contextlib.suppress(LockError):
                lock.release()

    def _pass(self, lock: Any) -> dict[str, int]:
        self.__dict__["_accounts"] = {}  # each pass looks its owners' accounts up afresh
        done = {}
        for name, step in (("cancelled", self._cancel_requested), ("moved", self._poll_live),
                           ("adopted", lambda: submitting.settle_unrecorded(self)),
                           ("submitted", lambda: submitting.submit_pending(self, lock))):
            try:
                done[name] = step()
            except GpuqError as e:  # the backend did not answer: the other steps still run
                log.warning("%s: %s failed this pass: %s", self.backend_name, name, e)
                done[name] = 0
        return done

    def jobs_in(self, *states: JobState) -> list[Job]:
        """This backend's jobs in `states`, by id."""
        with self.rt.session() as session:
            return list(session.exec(select(Job).where(
                col(Job.backend) == self.backend_name,
                col(Job.state).in_([s.value for s in states])).order_by(col(Job.id))))

    def pending_jobs(self, room: int) -> list[Job]:
        """The first `room` of this backend's PENDING jobs past their backoff, by id: read
        through the partial index of batch jobs waiting (app/store/models.py), so that a
        sync reads what it can submit, not every job queued."""
        with self.rt.session() as session:
            return list(session.exec(batch_pending(self.backend_name, time.time())
                                     .limit(room)))

    def _cancel_requested(self) -> int:
        jobs = [j for j in self.jobs_in(JobState.CANCELLING) if j.backend_id]
        if jobs:
            self.cancel([j.backend_id for j in jobs if j.backend_id])
        return len(jobs)

    def _poll_live(self) -> int:
        live = [j for j in self.jobs_in(JobState.STARTING, JobState.RUNNING, JobState.CANCELLING)
                if j.backend_id]
        if not live:
            return 0
        statuses = self.poll([j.backend_id for j in live if j.backend_id])
        moved = 0
        for job in live:
            assert job.backend_id is not None
            status = statuses.get(job.backend_id, Status("missing"))
            moved += self._apply(job, status)
        return moved

    def _apply(self, job: Job, status: Status) -> int:
        """Move one job as its backend status says; return 1 if it moved.

        Every write is fenced on the attempt this pass read: once a job has restarted (and
        lost its old backend id), a late status of its old backend job changes nothing."""
        assert job.id is not None and job.backend_id is not None
        now = time.time()
        where = [col(Job.id) == job.id, col(Job.attempt) == job.attempt]
        r = self.rt.redis
        if status.state != "missing":
            r.hdel(keys.BATCH_MISSING, job.backend_id)
        with self.rt.session() as session:
            if status.state == "pending":
                waited = now - (job.dispatched_at or now)
                if job.state == JobState.STARTING.value and waited > self.pending_timeout_s:
                    self.cancel([job.backend_id])
                    reason = f"pending on {self.backend_name} for {waited:.0f}s: {status.reason}"
                    return len(transition(session, JobState.FAILED, reason, where,
                                          {"ended_at": now}))
                return 0
            if status.state == "running":
                return len(transition(session, JobState.RUNNING, None, where,
                                      {"started_at": now}, only_from=[JobState.STARTING]))
            if status.state == "missing" and not self._vanished(job.backend_id, now):
                return 0
        if status.state == "missing":
            # Like a worker that died: restarted while restarts remain, else LOST.
            why = f"{self.backend_name} no longer knows job {job.backend_id}"
            cancelling = job.state == JobState.CANCELLING.value
            end = restart_policy.AttemptEnd(lost=not cancelling, cancelled=cancelling,
                                            why=f"cancelled; {why}" if cancelling else why)
            with self.rt.session() as session:
                moved = restart_policy.apply(session, job, end, {"ended_at": now})
            return self._after(job, moved)
        return self._finish(job, status, now)

    def _vanished(self, backend_id: str, now: float) -> bool:
        """Whether a job its backend does not know has been missing past the grace."""
        r = self.rt.redis
        r.hsetnx(keys.BATCH_MISSING, backend_id, now)
        first = float(r.hget(keys.BATCH_MISSING, backend_id) or now)  # type: ignore[arg-type]
        if now - first < self.vanished_grace_s:
            return False
        r.hdel(keys.BATCH_MISSING, backend_id)
        return True

    def _finish(self, job: Job, status: Status, now: float) -> int:
        """Record a job its backend says has ended, by the restart policy."""
        assert job.id is not None
        failure = self._route_result(job) if job.kind == "function" else None
        ended = {"ended_at": now, "exit_code": status.exit_code,
                 "started_at": job.started_at or now}
        with self.rt.session() as session:
            if job.state == JobState.STARTING.value and status.state == "succeeded":
                # It ran and ended between two polls: record that it ran.
                transition(session, JobState.RUNNING, None,
                           [col(Job.id) == job.id, col(Job.attempt) == job.attempt],
                           {"started_at": now}, only_from=[JobState.STARTING])
            moved = restart_policy.apply(session, job, _attempt_end(job, status, failure), ended)
        return self._after(job, moved)

    def _after(self, job: Job, moved: JobState | None) -> int:
        """1 if the policy moved the job. A restarted function job's envelope is dropped:
        the next attempt's end must not be read from it."""
        if moved is JobState.RECOVERING and job.kind == "function":
            assert job.id is not None
            self.forget_result(job)
            self.rt.redis.delete(keys.result(job.id))
        return int(moved is not None)

    def _route_result(self, job: Job) -> str | None:
        """Store a function job's envelope for `result()`; return why it failed, if it did."""
        assert job.id is not None
        data = self.read_result(job)
        if data is None:
            return None
        s = self.rt.settings
        return results.route(self.rt.redis, job.id, data, limit_bytes=s.max_result_bytes,
                             secret=s.secret, keep_s=s.keep_result_s)

    def payload_bytes(self, job: Job) -> tuple[bytes, dict[str, str]]:
        """The runner's payload (the launch's stored payload, or the job's own command)
        without the job's secrets, and those secrets, unsealed: a backend carries them apart
        from the payload, in its own secret store (`Submission.secrets`)."""
        spec: dict[str, Any]
        secrets: dict[str, str] = {}
        if job.payload_key is not None:
            s = self.rt.settings
            spec = payload_store.load(self.rt.redis, self.rt.engine, job.payload_key,
                                      cache_ttl_s=s.payload_ttl_s, secret=s.secret,
                                      limit_bytes=s.max_payload_bytes)
            secrets = sealing.payload_secrets(spec, s.secret, s.home)
            spec = sealing.without_secrets(spec)
        else:
            spec = {"command": job.command, "rank_args": None}
        return bytes(cloudpickle.dumps(spec)), secrets


def _results_name(job: Job) -> str:
    assert job.id is not None
    return area_results(job.launch_id, job.id)


def write_private(path: Path, data: bytes) -> None:
    """Write a file that only gpuq's user may read (0600 whatever the umask), whole or not
    at all: a node reads it under the same name."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)
