"""The Python client: submit and launch jobs, get future-like handles back.

    client = Client()
    job = client.submit("python train.py --lr 3e-4", gpus=1)
    job.wait(); print(job.status, job.logs())
"""

from __future__ import annotations

import copy
import datetime
import os
import shlex
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from app.client.http import Endpoint, StackUnreachable, default_transport, endpoint_of
from app.core import keys
from app.core.errors import (
    DatabaseUnavailable,
    GpuqError,
    InvalidJobSpec,
    JobNotFound,
    NotPermitted,
    OperationTimeout,
    PayloadTooLarge,
    RemoteError,
    error_from_envelope,
)
from app.core.identity import Actor, stack_owner
from app.core.keys import CONTROL_QUEUE
from app.core.states import JobState

if TYPE_CHECKING:
    from app.core.settings import Settings
    from app.ops.rows import JobDetail, LaunchRow
    from app.runtime import Runtime

POLL_S = 0.2
# Ids per `queue` call when rows are asked for by id: well inside every database's limit
# on the parameters of one statement.
IDS_PER_CALL = 1000


class Client:
    """Entry point of the API; `transport` is 'local' (in process), 'remote' (broker) or
    'http' (a dashboard at GPUQ_URL, as the named user whose token it shows).

    Given an `endpoint` (app/client/http.py endpoint_from_environment), it goes over http
    without loading its settings until it needs them; an endpoint that is the owner's own
    stack, when that stack does not take a call, leaves it to run in process."""

    def __init__(self, settings: Settings | None = None, transport: str | None = None,
                 endpoint: Endpoint | None = None) -> None:
        self._settings = settings
        self.endpoint = endpoint
        if endpoint is not None:
            self.transport = "http"
        else:
            self.transport = transport or default_transport(self.settings)
        if self.transport not in ("local", "remote", "http"):
            raise GpuqError(f"unknown transport {self.transport!r}; use 'local', 'remote' "
                            "or 'http'")
        self.actor: Actor | None = None  # None: the stack's owner
        if self.transport != "http":  # an http client loads no database, Redis or Celery
            self._runtime()

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from app.core.settings import Settings

            self._settings = Settings()
        return self._settings

    def _runtime(self) -> Runtime:
        from app.runtime import Runtime

        self.rt: Runtime = Runtime(self.settings)
        return self.rt

    def _in_process(self) -> Runtime:
        """Run in process from now on: the owner's stack did not take a call, or the client
        needs what only a process with the stack's Redis and database has."""
        self.transport, self.endpoint = "local", None
        return self._runtime()

    def __getattr__(self, name: str) -> Any:
        if name == "rt":  # an http client has none, unless it is the stack's owner
            if self.endpoint is not None and self.endpoint.socket is not None:
                return self._in_process()
            raise GpuqError("this needs the stack's Redis and database (function jobs, "
                            "secrets, results), which a named user reaching gpuq over "
                            "GPUQ_URL does not reach; submit shell commands")
        raise AttributeError(name)

    def acting_for(self, actor: Actor) -> Client:
        """This client, sharing its connections, running operations for `actor`."""
        other = copy.copy(self)
        other.actor = actor
        return other

    def call(self, op: str, /, **kwargs: Any) -> dict[str, Any]:
        """Run one operation of the operations layer over this client's transport."""
        if self.transport == "http":
            try:
                return (self.endpoint or endpoint_of(self.settings)).call(op, kwargs)
            except StackUnreachable:
                self._in_process()
        if self.transport == "local":
            from sqlalchemy.exc import OperationalError

            from app.ops.registry import call_local

            try:
                return call_local(self.rt, op, kwargs, self.actor)
            except OperationalError as e:
                raise database_unavailable(e) from e
        if self.actor is not None and self.actor != stack_owner() and \
                not self.settings.secret:
            # Only a signed control message names its actor: unsigned, the control worker
            # would run it as the stack's owner.
            raise NotPermitted("a named user's operation travels over the remote transport "
                               "only signed: set GPUQ_SECRET, or serve the dashboard with "
                               "GPUQ_TRANSPORT=local")
        return self._call_remote(op, kwargs)

    def _call_remote(self, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        from celery.exceptions import TimeoutError as CeleryTimeout

        from app.core import signing

        secret = self.settings.secret
        # With a shared secret the arguments travel only inside the signed part.
        args = ([name, None, signing.sign(secret, signing.OP_PURPOSE, name, kwargs,
                                          self.actor or stack_owner())]
                if secret else [name, kwargs])
        result = self.rt.celery.send_task("gpuq.op", args=args, queue=CONTROL_QUEUE)
        try:
            envelope = result.get(timeout=self.settings.op_timeout_s)
        except CeleryTimeout:
            raise OperationTimeout(
                f"no control worker answered {name!r} within {self.settings.op_timeout_s}s; "
                "start one with `gpuq up` or `gpuq control-worker`"
            ) from None
        finally:
            result.forget()
        if not envelope["ok"]:
            raise error_from_envelope(envelope["code"], envelope["message"])
        value: dict[str, Any] = envelope["value"]
        return value

    def submit(self, command: str | Sequence[str] | Callable[..., Any], *args: Any,
               allow_duplicate: bool = False, secrets: dict[str, str] | None = None,
               **options: Any) -> JobHandle:
        """Queue one job: a shell command, or a Python callable with `args`.

        Options are JobSpec fields (gpus, name, priority, env, ...; time="2h" is the time
        limit, time_limit_s in seconds). `secrets` are
        environment variables that reach the job but are kept out of the job table, the
        broker's messages and gpuq's logs (they travel sealed in the job's stored payload). A
        command identical to one not yet ended raises DuplicateJob, unless allow_duplicate
        (a job with secrets has a payload of its own, so it is never a duplicate)."""
        hidden = self._secrets(secrets)
        if callable(command):
            payload = {"kind": "function", "call": _pickled_call(command, args), **hidden}
            spec = {**_spec(_describe(command), _function_options(options)), "kind": "function"}
            out = self._with_payload(payload, lambda key: self.call(
                "submit", spec={**spec, "payload_key": key}, allow_duplicate=True))
            return JobHandle(self, out["job_ids"][0])
        if args:
            raise GpuqError("arguments after a shell command belong in the command itself")
        spec = _spec(command, options)
        if hidden:
            payload = {"kind": "command", "command": spec["command"], "rank_args": None,
                       **hidden}
            out = self._with_payload(payload, lambda key: self.call(
                "submit", spec={**spec, "payload_key": key}, allow_duplicate=allow_duplicate))
        else:
            out = self.call("submit", spec=spec, allow_duplicate=allow_duplicate)
        return JobHandle(self, out["job_ids"][0])

    def launch(self, command: str | Sequence[str] | Callable[..., Any],
               num_jobs: int | None = None, *args: Any,
               rank_args: Sequence[Sequence[Any]] | None = None,
               secrets: dict[str, str] | None = None, **options: Any) -> LaunchHandle:
        """Queue N replicas of one command or function call, stored once; each replica
        sees its GPUQ_JOB_RANK and GPUQ_NUM_JOBS.

        `{rank}` and `{num_jobs}` in a command are replaced per replica; `rank_args`
        gives each replica its own arguments (N defaults to their number). A function is
        called with `args` in every replica. `secrets` as for `submit`."""
        hidden = self._secrets(secrets)
        if callable(command):
            if num_jobs is None:
                raise GpuqError("say how many replicas: launch(fn, num_jobs, *args)")
            spec = {**_spec(_describe(command), _function_options(options)), "kind": "function"}
            out = self._with_payload(
                {"kind": "function", "call": _pickled_call(command, args), **hidden},
                lambda key: self.call("launch", spec={**spec, "payload_key": key},
                                      num_jobs=num_jobs))
            return LaunchHandle(self, out["launch_id"], out["job_ids"])
        if args:
            raise GpuqError("arguments after a shell command belong in the command itself")
        if rank_args is not None:
            num_jobs = len(rank_args) if num_jobs is None else num_jobs
            if num_jobs != len(rank_args):
                raise GpuqError(f"{len(rank_args)} argument sets for {num_jobs} replicas: "
                                "give one set per replica")
        if num_jobs is None:
            raise GpuqError("say how many replicas: num_jobs=N or rank_args=[...]")
        spec = _spec(command, options)
        if rank_args is None and not hidden:  # each row holds the command: no payload
            out = self.call("launch", spec=spec, num_jobs=num_jobs)
            return LaunchHandle(self, out["launch_id"], out["job_ids"])
        payload = {"kind": "command", "command": spec["command"],
                   "rank_args": [list(a) for a in rank_args] if rank_args is not None else None,
                   **hidden}
        out = self._with_payload(payload, lambda key: self.call(
            "launch", spec={**spec, "payload_key": key}, num_jobs=num_jobs))
        return LaunchHandle(self, out["launch_id"], out["job_ids"])

    def map(self, fn: Callable[..., Any], items: Iterable[Any],
            secrets: dict[str, str] | None = None, **options: Any) -> LaunchHandle:
        """A launch of `fn(item)` for each item: replica r calls it on the r-th item.

        Returns the LaunchHandle at once; `client.map(fn, items).results()` waits and gives
        the values in the order of `items`."""
        import cloudpickle

        hidden = self._secrets(secrets)
        values = list(items)
        if not values:
            raise GpuqError("map() needs at least one item")
        payload = {"kind": "function", "call": _pickled_call(fn, ()),
                   "items": [cloudpickle.dumps(v) for v in values], **hidden}
        spec = {**_spec(_describe(fn), _function_options(options)), "kind": "function"}
        out = self._with_payload(payload, lambda key: self.call(
            "launch", spec={**spec, "payload_key": key}, num_jobs=len(values)))
        return LaunchHandle(self, out["launch_id"], out["job_ids"])

    def _secrets(self, secrets: dict[str, str] | None) -> dict[str, Any]:
        """The payload entry of secret variables, sealed (app/core/sealing.py): the payload
        passes through Redis, whose append-only file would keep them in plain. Sealed with
        GPUQ_SECRET, else (in process only) with the stack's own key in GPUQ_HOME."""
        if not secrets:
            return {}
        _check_secrets(secrets)
        from app.core import sealing

        if not self.settings.secret and self.transport == "remote":
            raise InvalidJobSpec("secrets need GPUQ_SECRET over the remote transport (they "
                                 "are sealed with it before they reach Redis): set the same "
                                 "GPUQ_SECRET as the workers")
        material = sealing.key_material(self.settings.secret, self.settings.home, create=True)
        return {"sealed_secrets": sealing.seal(dict(secrets), material)}

    def _with_payload(self, payload: dict[str, Any],
                      enqueue: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        """Store the payload once in Redis (refused above the size limit before anything
        is queued), then queue; the operation copies it into the database with the jobs.

        The client never deletes it: the operation that refuses a launch removes its
        payload, and a call whose answer never came (a timeout, Ctrl-C, a lost connection)
        may still have been accepted, so its payload stays. A copy no launch took expires
        with GPUQ_PAYLOAD_TTL_S."""
        from app.core import payloads
        settings = self.settings
        try:
            key = payloads.store(self.rt.redis, payload, settings.payload_ttl_s,
                                 settings.max_payload_bytes, secret=settings.secret)
        except PayloadTooLarge as e:
            raise PayloadTooLarge(f"payload refused: {e} (GPUQ_MAX_PAYLOAD_BYTES)") from None
        return enqueue(key)

    def job(self, job_id: int) -> JobHandle:
        return JobHandle(self, job_id)

    def rows(self, job_ids: Sequence[int]) -> list[dict[str, Any]]:
        """The rows of those of these jobs that exist, in the order asked (asked for in
        pages, so that any number of ids stays inside the database's bound parameters)."""
        found: dict[int, dict[str, Any]] = {}
        distinct = list(dict.fromkeys(job_ids))
        for start in range(0, len(distinct), IDS_PER_CALL):
            page = distinct[start:start + IDS_PER_CALL]
            for row in self.call("queue", ids=page, limit=len(page))["jobs"]:
                found[row["id"]] = row
        return [found[i] for i in job_ids if i in found]

    def wait(self, job_ids: Sequence[int], timeout_s: float | None = None
             ) -> list[dict[str, Any]]:
        """Block until every job is in a terminal state; return their rows in the order
        asked. Raise JobNotFound naming the ids that do not exist."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        ended: dict[int, dict[str, Any]] = {}
        waiting = list(dict.fromkeys(job_ids))
        while True:
            rows = self.rows(waiting)
            missing = sorted(set(waiting) - {row["id"] for row in rows})
            if missing:
                raise JobNotFound.for_ids(missing)
            # An ended job never moves again: only the others are asked for again.
            ended.update((row["id"], row) for row in rows if JobState(row["status"]).terminal)
            waiting = [i for i in waiting if i not in ended]
            if not waiting:
                return [ended[i] for i in job_ids]
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{len(waiting)} of {len(ended) + len(waiting)} jobs still "
                                   f"not ended after {timeout_s}s")
            time.sleep(POLL_S)

    def wait_launch(self, launch_id: int, timeout_s: float | None = None) -> LaunchRow:
        """Block until every replica of a launch has ended, however many it has (polling
        its count per state); return its row. Raise LaunchNotFound when there is none."""
        from app.ops.rows import LaunchRow

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            launch = LaunchRow.model_validate(
                self.call("launches", launch_id=launch_id)["launches"][0])
            if launch.done >= launch.num_jobs:
                return launch
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"launch {launch_id}: {launch.num_jobs - launch.done} of "
                                   f"{launch.num_jobs} replicas still not ended after "
                                   f"{timeout_s}s")
            time.sleep(POLL_S)

    def launch_rows(self, launch_id: int) -> list[dict[str, Any]]:
        """Every replica's row in rank order, page by page (a launch may have 100,000)."""
        from app.ops.rows import MAX_PAGE

        rows: list[dict[str, Any]] = []
        while True:
            page = self.call("queue", launch_id=launch_id, limit=MAX_PAGE,
                             offset=len(rows))["jobs"]
            rows += page
            if len(page) < MAX_PAGE:
                return rows

    def close(self) -> None:
        if "rt" in self.__dict__:
            self.rt.close()


def database_unavailable(error: Exception) -> DatabaseUnavailable:
    """One line for a database that did not answer in time: locked by a long write past
    its busy timeout, or down."""
    cause = str(getattr(error, "orig", None) or error).replace("\n", " ").strip()
    return DatabaseUnavailable(
        f"the database did not answer: {cause}; a long write may hold it, or it is down: "
        "try again shortly, and check GPUQ_DATABASE_URL if it persists")


def _outcome(client: Client, job_id: int, state: str, data: Any) -> Any:
    """The value of an ended function job from its stored result, or its remote exception
    raised with the remote traceback as a note."""
    import cloudpickle

    from app.core import results
    if data is None:
        reason = client.rows([job_id])[0]["reason"]
        raise GpuqError(f"job {job_id} ended {state} without a result"
                        + (f": {reason}" if reason else ""))
    # Only this client, which asked for the job, unpickles what the job wrote.
    status, pickled = results.load(bytes(data), job_id, client.settings.secret)
    if status.ok:
        return cloudpickle.loads(pickled)
    error = _rebuild(pickled)
    if error is not None:
        error.add_note(f"remote traceback (job {job_id}):\n{status.traceback}")
        raise error
    raise RemoteError(f"job {job_id} raised {status.type}: {status.message}\n"
                      f"{status.traceback}")


def _rebuild(pickled: bytes) -> BaseException | None:
    """The remote exception, when it unpickles here."""
    if not pickled:
        return None
    import cloudpickle

    try:
        error = cloudpickle.loads(pickled)
    except Exception:
        return None
    return error if isinstance(error, BaseException) else None


def _pickled_call(fn: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
    """The call as bytes of its own: only the job's process unpickles it, where the
    function's modules can be imported (the worker itself never runs user code)."""
    import cloudpickle  # only function jobs need it: the CLI starts faster without

    return bytes(cloudpickle.dumps({"fn": fn, "args": args, "kwargs": {}}))


def _check_secrets(secrets: dict[str, str]) -> None:
    """Secret variables are checked like any environment variable."""
    for name, value in secrets.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidJobSpec("secrets are names and values, both strings")
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise InvalidJobSpec(f"bad secret name {name!r}: a variable name is not empty and "
                                 "holds no '=' or NUL (and its value no NUL)")


def _function_options(options: dict[str, Any]) -> dict[str, Any]:
    """A function job runs where it was submitted from unless told otherwise, so that
    functions of the caller's own modules import there."""
    return {"workdir": os.getcwd(), **options}


def _describe(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"python: {getattr(fn, '__module__', '?')}.{name}(...)"


def _spec(command: str | Sequence[str], options: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(command, str) and (not command or not str(command[0]).strip()):
        # `gpuq submit -- ''` would run a program named '' (exit 127, at run time).
        raise InvalidJobSpec("invalid job: command: the command is empty; give one after "
                             "`--`, e.g. -- python train.py")
    text = command if isinstance(command, str) else shlex.join(command)
    return {"command": text, **{_FIELDS.get(k, k): _time(v) if k == "time" else v
                                for k, v in options.items() if v is not None}}


# The client's names for JobSpec fields whose name carries a unit: time="2h" (or a
# timedelta) is the job's time limit, as `--time` and the jobs file's `time=` are.
_FIELDS = {"time": "time_limit_s"}


def _time(value: Any) -> Any:
    """A time limit as JobSpec reads it: a duration's text ("2h", "1:30:00"), as is, or
    a timedelta in whole seconds."""
    if isinstance(value, datetime.timedelta):
        return max(1, round(value.total_seconds()))
    return value


class JobHandle:
    """A submitted job, in the manner of a future."""

    def __init__(self, client: Client, job_id: int) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"JobHandle({self.id})"

    def row(self) -> dict[str, Any]:
        """The job's row as the operations answer it (JSON)."""
        return self.client.rows([self.id])[0]

    def info(self) -> JobDetail:
        """The job's typed row with its environment and events, oldest first."""
        from app.ops.rows import JobDetail

        return JobDetail.model_validate(self.client.call("job", job_id=self.id))

    @property
    def status(self) -> str:
        return str(self.row()["status"])

    def done(self) -> bool:
        return JobState(self.status).terminal

    def wait(self, timeout_s: float | None = None) -> str:
        """Block until the job ends; return its final status."""
        return str(self.client.wait([self.id], timeout_s)[0]["status"])

    def logs(self, head: int | None = None, tail: int | None = None) -> str:
        """The job's whole log as it is now, or its first `head` or last `tail` lines."""
        return "".join(page["text"] for page in self.log_pages(head=head, tail=tail))

    def log_pages(self, head: int | None = None, tail: int | None = None,
                  follow: bool = False, poll_s: float = 0.3) -> Iterator[dict[str, Any]]:
        """The `logs` operation's answers, one chunk each, from the log's start (or the
        first of its last `tail` lines) to its end as it was at the first read, or after
        `head` lines; with `follow`, on as it grows until the job has ended."""
        out = self.client.call("logs", job_id=self.id, head=head, tail=tail)
        end, left = out.get("size", 0), head
        while True:
            yield out
            if left is not None:
                left -= out["text"].count("\n")
                if left <= 0:
                    return
            if not out["text"]:
                if not follow or JobState(out["status"]).terminal:
                    return
                time.sleep(poll_s)
            elif not follow and out["offset"] >= end:
                return
            out = self.client.call("logs", job_id=self.id, offset=out["offset"], head=left)

    def result(self, timeout_s: float | None = None) -> Any:
        """Wait for a function job; return its value or raise its exception, whose notes
        carry the remote traceback."""

        status = self.wait(timeout_s)
        data = self.client.rt.redis.get(keys.result(self.id))
        return _outcome(self.client, self.id, status, data)

    def cancel(self) -> dict[str, Any]:
        return self.client.call("cancel", ids=[self.id])

    def set_time(self, time: str) -> dict[str, Any]:
        """Change its time limit ("30m"; "none" lifts it): shorter is yours to choose,
        longer an admin's (`gpuq update ID --time T`)."""
        return self.client.call("update", ids=[self.id], time=time)

    def why(self) -> dict[str, Any]:
        """Why it is PENDING: {"code": ..., "reason": ...} (`gpuq why`)."""
        return self.client.call("why", job_id=self.id)


class LaunchHandle:
    """The N replicas of one launch; iterating gives their JobHandles in rank order."""

    def __init__(self, client: Client, launch_id: int, job_ids: list[int]) -> None:
        self.client = client
        self.id = launch_id
        self.job_ids = job_ids  # in rank order: replica r is job_ids[r]

    def __repr__(self) -> str:
        return f"LaunchHandle({self.id}, {len(self.job_ids)} replicas)"

    def __len__(self) -> int:
        return len(self.job_ids)

    def __iter__(self) -> Iterator[JobHandle]:
        return iter(self.jobs)

    @property
    def jobs(self) -> list[JobHandle]:
        """A handle per replica, in rank order."""
        return [JobHandle(self.client, i) for i in self.job_ids]

    def results(self, timeout_s: float | None = None) -> list[Any]:
        """Wait for every replica of a function launch; return their values in rank order,
        or raise the error of the lowest-ranked replica that failed, with its remote
        traceback as a note (as JobHandle.result does for one job)."""

        rows = {r["id"]: r for r in self.wait(timeout_s)}
        stored = self.client.rt.redis.mget([keys.result(i) for i in self.job_ids])
        return [_outcome(self.client, job_id, rows[job_id]["status"], data)
                for job_id, data in zip(self.job_ids, stored, strict=True)]

    def info(self) -> LaunchRow:
        """The launch's typed row: its replicas' counts per state."""
        from app.ops.rows import LaunchRow

        return LaunchRow.model_validate(
            self.client.call("launches", launch_id=self.id)["launches"][0])

    def counts(self) -> dict[str, int]:
        return self.info().counts

    def wait(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Block until every replica has ended (polling one count per state); return their
        rows in rank order."""
        self.client.wait_launch(self.id, timeout_s)
        return self.client.launch_rows(self.id)

    def cancel(self) -> dict[str, Any]:
        return self.client.call("cancel", launch_id=self.id)
