"""The operations layer: queue, cancel, logs, submit, launch, status as plain functions.

Every operation takes the process's Runtime and JSON-able keyword arguments and returns a
JSON-able dict, so that the same function serves both transports: called directly in
local mode, or run by the control worker as the `gpuq.op` task in remote mode.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
import typing
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from sqlalchemy import ColumnElement, func
from sqlmodel import Session, col, select

from app.core import keys
from app.core.backends import adapter_class
from app.core.errors import InvalidArguments, InvalidJobSpec, LaunchNotFound, UnknownOperation
from app.core.keys import CONTROL_QUEUE
from app.core.paths import JobPaths
from app.core.states import JobState
from app.runtime import Runtime
from app.store import cluster
from app.store.exits import recent_exits
from app.store.jobs import (
    JobSpec,
    create_jobs,
    drop_payload_if_finished,
    get_jobs,
    job_row,
    refuse_duplicate,
    transition,
)
from app.store.models import Job, JobDependency, JobEvent, Launch

log = logging.getLogger(__name__)

Operation = Callable[..., dict[str, Any]]
OPERATIONS: dict[str, Operation] = {}

LOG_CHUNK_BYTES = 1 << 20
MAX_PAGE = 10_000


def operation(fn: Operation) -> Operation:
    OPERATIONS[fn.__name__] = fn
    return fn


def call_local(rt: Runtime, name: object, kwargs: object) -> dict[str, Any]:
    """Run an operation on arguments that may come from the network: an unknown name or
    arguments the operation does not take are refused before anything runs."""
    if not isinstance(name, str) or name not in OPERATIONS:
        raise UnknownOperation(
            f"unknown operation {name!r}; known: {', '.join(sorted(OPERATIONS))}")
    if not isinstance(kwargs, dict):
        raise InvalidArguments(f"operation {name!r} takes an object of named arguments, not "
                               f"{type(kwargs).__name__}; it takes {_described(name)}")
    model = _arguments(name)
    try:
        checked = model.model_validate(kwargs)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: "
                             f"{err['msg']}" for err in e.errors())
        raise InvalidArguments(f"operation {name!r}: {problems}; it takes "
                               f"{_described(name)}") from None
    return OPERATIONS[name](rt, **{field: getattr(checked, field)
                                   for field in model.model_fields})


@cache
def _arguments(name: str) -> type[BaseModel]:
    """A model of an operation's keyword arguments, from its signature."""
    fn = OPERATIONS[name]
    hints = typing.get_type_hints(fn)
    fields: dict[str, Any] = {
        p.name: (hints[p.name], ... if p.default is inspect.Parameter.empty else p.default)
        for p in list(inspect.signature(fn).parameters.values())[1:]}
    return create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)


def _described(name: str) -> str:
    params = list(inspect.signature(OPERATIONS[name]).parameters.values())[1:]
    return ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}="
                     f"{p.default!r}" for p in params) or "no arguments"


def _kick_batch(rt: Runtime, backend: str) -> None:
    """Ask the control worker to submit a batch backend's new jobs now."""
    rt.celery.send_task(f"gpuq.batch.{backend}", args=["sync-now"], queue=CONTROL_QUEUE,
                        ignore_result=True)


def _kick_dispatch(rt: Runtime) -> None:
    """Route what can start now. The jobs are stored already: a broker hiccup here must not
    report them as refused, so it is logged and the periodic pass routes them later."""
    import redis

    from scheduler.dispatch.allocator import Dispatcher

    try:
        Dispatcher(rt).dispatch(max_passes=2)
    except (redis.RedisError, OSError) as e:
        log.warning("stored, but not routed yet (%s); the periodic dispatch will route it", e)


@operation
def submit(rt: Runtime, spec: dict[str, Any], allow_duplicate: bool = False) -> dict[str, Any]:
    """Store one job PENDING and try to route it at once.

    A job identical (same content hash) to one that has not ended is refused, naming the
    existing id, unless `allow_duplicate`."""
    job_spec = JobSpec.parse(spec)
    _check_preflight(rt, job_spec)
    rt.check_broker()  # refuse before storing anything when the broker is unreachable
    with rt.session() as session:
        if not allow_duplicate:
            refuse_duplicate(session, job_spec)
        _, ids = create_jobs(session, job_spec, 1, launch=False)
        _fail_if_too_big(rt, session, job_spec, col(Job.id).in_(ids))
    _route(rt, job_spec.backend)
    return {"job_ids": ids, "launch_id": None}


def _route(rt: Runtime, backend: str) -> None:
    if backend == "local":
        _kick_dispatch(rt)
    else:
        _kick_batch(rt, backend)


def _fail_if_too_big(rt: Runtime, session: Session, spec: JobSpec,
                     where: ColumnElement[bool]) -> None:
    """Jobs no registered host can ever hold end FAILED_NO_RESOURCE at once."""
    from scheduler.dispatch.allocator import no_resource_reason

    largest = cluster.largest_host(rt.redis)
    if spec.backend == "local" and largest is not None and spec.gpus > largest:
        transition(session, JobState.FAILED_NO_RESOURCE, no_resource_reason(spec.gpus, largest),
                   [where], only_from=[JobState.PENDING])


def _check_preflight(rt: Runtime, spec: JobSpec) -> None:
    if spec.preflight is not None and spec.preflight not in rt.settings.preflight_checks:
        raise InvalidJobSpec(f"unknown preflight {spec.preflight!r}; choose one of "
                             f"{', '.join(rt.settings.preflight_checks)}")


@operation
def submit_many(rt: Runtime, origin: str, specs: list[dict[str, Any]]) -> dict[str, Any]:
    """Submit the lines of a jobs file: each distinct job once per origin, ever."""
    parsed: dict[str, JobSpec] = {}
    for spec in specs:
        job_spec = JobSpec.parse({**spec, "origin": origin})
        _check_preflight(rt, job_spec)
        parsed.setdefault(job_spec.content_hash(), job_spec)
    rt.check_broker()
    with rt.session() as session:
        known = set(session.scalars(select(Job.content_hash).where(
            col(Job.origin) == origin, col(Job.content_hash).in_(list(parsed)))))
        ids = [create_jobs(session, job_spec, 1, launch=False)[1][0]
               for digest, job_spec in parsed.items() if digest not in known]
    if ids:
        _kick_dispatch(rt)
    return {"submitted": ids, "known": len(specs) - len(ids)}


@operation
def launch(rt: Runtime, spec: dict[str, Any], num_jobs: int) -> dict[str, Any]:
    """Store N replicas PENDING in one statement and route as many as GPUs allow."""
    job_spec = JobSpec.parse(spec)
    _check_preflight(rt, job_spec)
    rt.check_broker()  # refuse before storing anything when the broker is unreachable
    with rt.session() as session:
        launch_id, ids = create_jobs(session, job_spec, num_jobs, launch=True)
        _fail_if_too_big(rt, session, job_spec, col(Job.launch_id) == launch_id)
    _route(rt, job_spec.backend)
    return {"job_ids": ids, "launch_id": launch_id}


@operation
def dispatch(rt: Runtime) -> dict[str, Any]:
    from scheduler.dispatch.allocator import Dispatcher

    return {"routed": Dispatcher(rt).dispatch()}


def _filters(status: str | None, launch_id: int | None, name: str | None,
             ids: list[int] | None) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if status:
        try:
            where.append(col(Job.state) == JobState(status.upper()).value)
        except ValueError:
            raise InvalidJobSpec(
                f"unknown status {status!r}; choose one of {', '.join(s.value for s in JobState)}"
            ) from None
    if launch_id is not None:
        where.append(col(Job.launch_id) == launch_id)
    if name:
        where.append(col(Job.name) == name)
    if ids:
        where.append(col(Job.id).in_(ids))
    return where


# Columns a page of the queue may be sorted by; `-name` sorts descending.
SORT_KEYS: dict[str, Any] = {
    "id": Job.id, "name": Job.name, "status": Job.state, "gpus": Job.gpus, "host": Job.host,
    "priority": Job.priority, "submitted": Job.submitted_at, "rank": Job.rank,
    "restarts": Job.restart_count, "exit_code": Job.exit_code,
}


def _order(sort: str | None, launch_id: int | None) -> list[Any]:
    if not sort:
        return [col(Job.rank), col(Job.id)] if launch_id is not None else [col(Job.id).desc()]
    key = sort.removeprefix("-")
    if key not in SORT_KEYS:
        raise InvalidJobSpec(f"unknown sort {sort!r}; choose one of {', '.join(SORT_KEYS)} "
                             "(prefix - for descending)")
    column, by_id = col(SORT_KEYS[key]), col(Job.id)
    return [column.desc(), by_id.desc()] if sort.startswith("-") else [column, by_id]


@operation
def queue(rt: Runtime, status: str | None = None, launch_id: int | None = None,
          name: str | None = None, ids: list[int] | None = None, limit: int = 50,
          offset: int = 0, sort: str | None = None) -> dict[str, Any]:
    """A page of jobs (newest first; by rank within a launch; or by `sort`) and the total
    that match."""
    if not 0 < limit <= MAX_PAGE:
        raise InvalidJobSpec(f"--limit must be between 1 and {MAX_PAGE}")
    if offset < 0:
        raise InvalidArguments("offset counts rows to skip: 0 or more")
    where = _filters(status, launch_id, name, ids)
    order = _order(sort, launch_id)
    now = time.time()
    with rt.session() as session:
        total = session.scalar(select(func.count()).select_from(Job).where(*where)) or 0
        jobs = session.exec(select(Job).where(*where).order_by(*order)
                            .offset(offset).limit(limit))
        rows = [job_row(job, now) for job in jobs]
    return {"jobs": rows, "total": total}


@operation
def job(rt: Runtime, job_id: int) -> dict[str, Any]:
    """One job with its events, oldest first."""
    with rt.session() as session:
        found = get_jobs(session, [job_id])[0]
        events = session.exec(select(JobEvent).where(JobEvent.job_id == job_id)
                              .order_by(col(JobEvent.id)))
        row = job_row(found, time.time())
        row["env"] = dict(found.env)
        row["pid"] = found.pid
        row["tmux"] = found.tmux
        row["preflight"] = found.preflight
        row["after"] = sorted(session.scalars(select(JobDependency.after_id).where(
            JobDependency.job_id == job_id))) or None
        row["events"] = [{"at": e.at, "from": e.from_state, "to": e.to_state,
                          "reason": e.reason} for e in events]
    return row


@operation
def launches(rt: Runtime, launch_id: int | None = None) -> dict[str, Any]:
    """Launches with their replica counts per state."""
    with rt.session() as session:
        query = select(Launch).order_by(col(Launch.id).desc()).limit(100)
        if launch_id is not None:
            query = select(Launch).where(Launch.id == launch_id)
        rows = list(session.exec(query))
        if launch_id is not None and not rows:
            raise LaunchNotFound(f"no launch with id {launch_id}; `gpuq queue` shows launch ids")
        counts = session.exec(
            select(col(Job.launch_id), col(Job.state), func.count())
            .where(col(Job.launch_id).in_([r.id for r in rows]))
            .group_by(col(Job.launch_id), col(Job.state)))
        by_launch: dict[int, dict[str, int]] = {}
        for lid, state, n in counts:
            by_launch.setdefault(int(lid or 0), {})[state] = n
    return {"launches": [{"id": r.id, "name": r.name, "num_jobs": r.num_jobs,
                          "command": r.command, "counts": by_launch.get(r.id or 0, {})}
                         for r in rows]}


@operation
def cancel(rt: Runtime, ids: list[int] | None = None, name: str | None = None,
           launch_id: int | None = None, all_jobs: bool = False) -> dict[str, Any]:
    """Cancel jobs: waiting ones end CANCELLED now, running ones are told to stop."""
    if not (ids or name or launch_id is not None or all_jobs):
        raise InvalidJobSpec("say what to cancel: job ids, --name, --launch or --all")
    where = _filters(None, launch_id, name, ids)
    with rt.session() as session:
        if ids:
            get_jobs(session, ids)  # unknown ids: refuse before changing anything
        if launch_id is not None and session.get(Launch, launch_id) is None:
            raise LaunchNotFound(f"no launch with id {launch_id}; `gpuq queue` shows launch ids")
        gpu_queue_job = col(Job.backend) == "local"
        ended = {"ended_at": time.time()}
        cancelled = transition(session, JobState.CANCELLED, "cancelled by user", where, ended,
                               only_from=[JobState.PENDING, JobState.RECOVERING])
        cancelled += transition(session, JobState.CANCELLED, "cancelled by user",
                                [*where, gpu_queue_job], ended, only_from=[JobState.STARTING])
        # Running jobs, and batch jobs already at their backend, are stopped where they run.
        stopping = transition(session, JobState.CANCELLING, "cancel requested", where,
                              only_from=[JobState.RUNNING])
        stopping += transition(session, JobState.CANCELLING, "cancel requested",
                               [*where, ~gpu_queue_job], only_from=[JobState.STARTING])
        already = list(session.scalars(select(Job.id).where(
            *where, col(Job.state) == JobState.CANCELLING.value)))
        payloads = session.exec(
            select(func.min(Job.id), col(Job.launch_id), col(Job.payload_key))
            .where(*where, col(Job.payload_key).is_not(None))
            .group_by(col(Job.launch_id), col(Job.payload_key))).all() if cancelled else []
    if already:
        pipe = rt.redis.pipeline(transaction=False)
        for job_id in already:
            pipe.set(keys.cancel(job_id), 1, ex=86400)
        pipe.execute()
    for job_id, lid, key in payloads:
        with rt.session() as session:
            drop_payload_if_finished(session, rt.redis, job_id or 0, lid, key)
    return {"cancelled": sorted(cancelled), "cancelling": sorted(stopping)}


@operation
def logs(rt: Runtime, job_id: int, offset: int = 0) -> dict[str, Any]:
    """Up to 1 MiB of a job's log from byte `offset`, and the offset to continue from.
    A job whose backend keeps its output elsewhere gets a `where` naming the place."""
    if offset < 0:
        raise InvalidArguments("offset is a byte position in the log: 0 or more")
    with rt.session() as session:
        job = get_jobs(session, [job_id])[0]
    state = job.state
    path: Path | None = JobPaths(rt.settings.home, job_id).log
    where = None
    if job.backend != "local":
        path, where = adapter_class(job.backend).output(rt.settings, job)
    data = b""
    if path is not None:
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
            f.seek(offset)
            data = f.read(LOG_CHUNK_BYTES)
    return {"text": data.decode(errors="replace"), "offset": offset + len(data),
            "status": state, "where": where}


@operation
def status(rt: Runtime) -> dict[str, Any]:
    """Hosts and their GPUs (alive, held by which job), job counts per state, workers whose
    heartbeat stopped, recent exits of supervised programs (crash loops), and the
    addresses of Flower and the dashboard."""
    r = rt.redis
    hosts = cluster.gpu_table(r)
    with rt.session() as session:
        counts = dict(session.exec(select(Job.state, func.count()).group_by(Job.state)).all())
    s = rt.settings
    return {"hosts": hosts, "counts": counts,
            "stale_workers": [f"{h['host']}/gpu{g['index']}" for h in hosts
                              for g in h["gpus"] if not g["alive"]],
            "programs": recent_exits(r),
            "flower": f"http://{s.flower_address}:{s.flower_port}",
            "dashboard": f"http://{s.dashboard_address}:{s.dashboard_port}"}

