"""Operations that store work: submit, submit_many (the jobs file), launch; and dispatch."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

from sqlalchemy import ColumnElement
from sqlmodel import Session, col

from app.core.errors import GpuqError, InvalidJobSpec, NotPermitted
from app.core.identity import Actor, stack_owner
from app.core.states import JobState
from app.ops.nudge import kick_batch, kick_dispatch
from app.ops.registry import operation
from app.runtime import Runtime
from app.store import cluster, limits, payload_store, projects
from app.store.file_jobs import Identity, absent_lines, check_origin, line_key, store_lines
from app.store.jobs import create_jobs, refuse_duplicate, transition
from app.store.models import Job
from app.store.spec import JobSpec

log = logging.getLogger(__name__)

@operation
def submit(rt: Runtime, spec: dict[str, Any], allow_duplicate: bool = False,
           actor: Actor | None = None) -> dict[str, Any]:
    """Store one job PENDING, owned by `actor`, and try to route it at once.

    A job identical (same content hash) to one of the actor's that has not ended is
    refused, naming the existing id, unless `allow_duplicate`."""
    owner = _owner(actor, spec)
    with payload_store.dropped_if_refused(rt.redis, rt.engine, spec.get("payload_key")):
        job_spec = JobSpec.parse(spec)
        _check_preflight(rt, job_spec)
        rt.check_broker()  # refuse before storing anything when the broker is unreachable
        with rt.session() as session:
            if not allow_duplicate:
                refuse_duplicate(session, job_spec, owner)
            job_spec = _within_limits(rt, session, job_spec, actor or stack_owner(), 1)
            _adopt_payload(rt, session, job_spec)
            _, ids = create_jobs(session, job_spec, 1, launch=False, owner=owner, viewer=actor)
            _fail_if_too_big(rt, session, job_spec, col(Job.id).in_(ids))
    _route(rt, job_spec.backend)
    return {"job_ids": ids, "launch_id": None}


def _owner(actor: Actor | None, spec: dict[str, Any]) -> str:
    """Who will own the jobs. A payload (a function call, secrets) is stored in Redis, which
    only the stack's owner reaches: a payload key from anyone else names another's payload,
    whose secrets their job would receive."""
    actor = actor or stack_owner()
    if spec.get("payload_key") is not None and actor != stack_owner():
        raise NotPermitted("only the stack's owner submits jobs with a stored payload "
                           "(function calls, secrets); submit a shell command")
    return actor.name


def _within_limits(rt: Runtime, session: Session, spec: JobSpec, actor: Actor,
                   adding: int) -> JobSpec:
    """The spec in its project (the owner's default when it names none) with its time
    limit (the owner's or project's default_time when it gives none), once the actor may
    submit to that project at that priority, the limit is within their max_time, and the
    owner and the project have room for `adding` more PENDING jobs; else NotPermitted or
    OverLimit names the grant or limit."""
    found = limits.read(session, rt.settings, strict=False)
    owner = actor.name
    project = spec.project or found.project_of(owner)
    if not actor.admin:
        _refuse_ungranted(rt, session, found, owner, project, spec.priority)
    time_limit_s = found.time_limit(owner, project, spec.time_limit_s)
    limits.refuse_over_pending(session, found, owner, project, adding)
    return spec.model_copy(update={"project": project, "time_limit_s": time_limit_s})


def _refuse_ungranted(rt: Runtime, session: Session, found: limits.Limits, owner: str,
                      project: str, priority: int) -> None:
    """A named user submits to their default project or one they are a member of (unless
    GPUQ_OPEN_PROJECTS), at no more than their and the project's max_priority."""
    if (not rt.settings.open_projects and project != found.project_of(owner)
            and not projects.is_member(session, project, owner)):
        raise NotPermitted(
            f"user {owner} is not a member of project {project}: submit to your default "
            f"project {found.project_of(owner)}, or ask an admin to add you (gpuq project "
            f"members {project} --add {owner})")
    for kind, name in (("user", owner), ("project", project)):
        most = found.max_priority(kind, name)
        if most is not None and priority > most:
            raise NotPermitted(
                f"priority {priority} is over {kind} {name}'s max_priority {most}: submit at "
                f"{most} or lower, or ask an admin to raise it (gpuq limits set --{kind} "
                f"{name} --max-priority N)")


def _adopt_payload(rt: Runtime, session: Session, spec: JobSpec) -> None:
    """The payload the client stored in Redis becomes the database's, in the transaction
    that stores the jobs: an accepted launch never lacks it, a refused one never holds it."""
    if spec.payload_key is not None:
        payload_store.adopt(session, rt.redis, spec.payload_key, rt.settings.max_payload_bytes)


def _route(rt: Runtime, backend: str) -> None:
    """Route jobs already committed. Whatever fails here must not report them as refused
    (the caller would take them for lost, or store them again): it is logged, and the
    periodic dispatch or sync routes them."""
    try:
        if backend == "local":
            kick_dispatch(rt)
        else:
            kick_batch(rt, backend)
    except Exception as e:
        log.warning("stored, but not routed yet (%s: %s); the periodic pass will route them",
                    type(e).__name__, e)


def _fail_if_too_big(rt: Runtime, session: Session, spec: JobSpec,
                     where: ColumnElement[bool]) -> None:
    """Jobs no registered host can ever hold end FAILED_NO_RESOURCE at once."""
    from scheduler.planner.fit import no_resource_reason

    largest = cluster.largest_host(rt.redis)
    if spec.backend == "local" and largest is not None and spec.gpus > largest:
        transition(session, JobState.FAILED_NO_RESOURCE, no_resource_reason(spec.gpus, largest),
                   [where], only_from=[JobState.PENDING])


def _check_preflight(rt: Runtime, spec: JobSpec) -> None:
    if spec.preflight is not None and spec.preflight not in rt.settings.preflight_checks:
        raise InvalidJobSpec(f"unknown preflight {spec.preflight!r}; choose one of "
                             f"{', '.join(rt.settings.preflight_checks)}")


# A jobs file is stored this many lines per transaction, so that other writers (a worker
# recording an outcome, a `gpuq submit`) get the database between two of them.
FILE_LINES_PER_TRANSACTION = 1_000
# The pause between two such transactions: longer than SQLite's longest wait (100 ms)
# between two tries of a writer blocked on its lock, so that a blocked writer gets in.
FILE_PAUSE_S = 0.15


@operation
def submit_many(rt: Runtime, origin: str, specs: list[dict[str, Any]],
                present: list[str] | None = None, forget: bool = False,
                actor: Actor | None = None) -> dict[str, Any]:
    """Submit the lines of a jobs file: each distinct line once, for as long as it stays in
    the file (app/store/file_jobs.py).

    A spec that is not a job spec refuses the whole call; a line that the server refuses
    (an unknown preflight, `after=` naming no such job) is reported in its own entry of
    `lines` (one per spec, in order) while the others are stored. Large files are stored
    in bounded transactions; a re-run after a crash stores each line once. `present`, the
    line keys of the whole file as it is now, answers `absent`: how many lines stored
    before are no longer in it; with `forget` (the watcher, once the file stayed the same)
    those are forgotten, so that one put back is submitted again. The jobs file is the
    stack owner's (its lines may reprioritize the jobs it stored before): a named user who
    is not an admin is refused."""
    if actor is not None and not actor.admin:
        raise NotPermitted("a jobs file is the stack owner's to submit; submit your jobs one "
                           "by one (gpuq submit)")
    check_origin(origin)
    lines = _store_file_lines(rt, origin, [JobSpec.parse(spec) for spec in specs])
    submitted = [line["job_id"] for line in lines if line["status"] == "submitted"]
    if submitted:
        kick_dispatch(rt)
    answer: dict[str, Any] = {
        "submitted": submitted, "known": sum(line["status"] != "submitted" and
                                             line["status"] != "refused" for line in lines),
        "lines": lines}
    if present is not None:
        with rt.session() as session:
            answer["absent"] = absent_lines(session, origin, present, forget)
    return answer


def _store_file_lines(rt: Runtime, origin: str, parsed: list[JobSpec]) -> list[dict[str, Any]]:
    """Each line's outcome: stored once per identity, in bounded transactions."""
    lines: list[dict[str, Any]] = [{} for _ in parsed]
    first: dict[Identity, int] = {}
    same_as: dict[int, int] = {}
    with rt.session() as session:
        found = limits.read(session, rt.settings, strict=False)
    owner = stack_owner().name
    for index, job_spec in enumerate(parsed):
        try:
            _check_preflight(rt, job_spec)
            parsed[index] = job_spec = job_spec.model_copy(update={"time_limit_s": (
                found.time_limit(owner, job_spec.project or found.project_of(owner),
                                 job_spec.time_limit_s))})
        except GpuqError as e:
            lines[index] = _refused(e)
            continue
        same_as[index] = first.setdefault(line_key(job_spec), index)
    if parsed:
        rt.check_broker()
    todo = sorted(set(same_as.values()))
    for start in range(0, len(todo), FILE_LINES_PER_TRANSACTION):
        if start:
            time.sleep(FILE_PAUSE_S)
        chunk = todo[start:start + FILE_LINES_PER_TRANSACTION]
        for index, outcome in _store_chunk(rt, origin, {i: parsed[i] for i in chunk}).items():
            lines[index] = outcome
    for index, original in same_as.items():
        if index != original:
            lines[index] = {**lines[original], "status": "known"} if lines[original].get(
                "job_id") else lines[original]
    return lines


def _refused(error: GpuqError) -> dict[str, Any]:
    return {"status": "refused", "job_id": None, "message": str(error)}


def _store_chunk(rt: Runtime, origin: str, specs: dict[int, JobSpec]) -> dict[
        int, dict[str, Any]]:
    """Store lines in one transaction; if one of them is refused, store them one by one so
    that the others go in and the refused one is named."""
    try:
        with rt.session() as session:
            return {i: asdict(o) for i, o in store_lines(session, origin, specs).items()}
    except GpuqError:
        if len(specs) == 1:
            raise
    outcomes: dict[int, dict[str, Any]] = {}
    for index, spec in specs.items():
        try:
            outcomes.update(_store_chunk(rt, origin, {index: spec}))
        except GpuqError as e:
            outcomes[index] = _refused(e)
    return outcomes


@operation
def launch(rt: Runtime, spec: dict[str, Any], num_jobs: int,
           actor: Actor | None = None) -> dict[str, Any]:
    """Store N replicas PENDING in one statement, owned by `actor`, and route as many as
    GPUs allow."""
    owner = _owner(actor, spec)
    with payload_store.dropped_if_refused(rt.redis, rt.engine, spec.get("payload_key")):
        job_spec = JobSpec.parse(spec)
        _check_preflight(rt, job_spec)
        rt.check_broker()  # refuse before storing anything when the broker is unreachable
        with rt.session() as session:
            job_spec = _within_limits(rt, session, job_spec, actor or stack_owner(),
                                      num_jobs)
            _adopt_payload(rt, session, job_spec)
            launch_id, ids = create_jobs(session, job_spec, num_jobs, launch=True,
                                         owner=owner, viewer=actor)
            _fail_if_too_big(rt, session, job_spec, col(Job.launch_id) == launch_id)
    _route(rt, job_spec.backend)
    return {"job_ids": ids, "launch_id": launch_id}


@operation
def dispatch(rt: Runtime) -> dict[str, Any]:
    from scheduler.dispatch.allocator import Dispatcher

    return {"routed": Dispatcher(rt).dispatch()}
