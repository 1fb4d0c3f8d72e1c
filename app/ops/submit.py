"""Operations that store work: submit, submit_many (the jobs file), launch; and dispatch."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import ColumnElement
from sqlmodel import Session, col, select

from app.core.errors import InvalidJobSpec
from app.core.states import JobState
from app.ops.nudge import kick_batch, kick_dispatch
from app.ops.registry import operation
from app.runtime import Runtime
from app.store import cluster, payload_store
from app.store.jobs import create_jobs, refuse_duplicate, transition
from app.store.models import Job
from app.store.spec import JobSpec

log = logging.getLogger(__name__)

@operation
def submit(rt: Runtime, spec: dict[str, Any], allow_duplicate: bool = False) -> dict[str, Any]:
    """Store one job PENDING and try to route it at once.

    A job identical (same content hash) to one that has not ended is refused, naming the
    existing id, unless `allow_duplicate`."""
    with payload_store.dropped_if_refused(rt.redis, rt.engine, spec.get("payload_key")):
        job_spec = JobSpec.parse(spec)
        _check_preflight(rt, job_spec)
        rt.check_broker()  # refuse before storing anything when the broker is unreachable
        with rt.session() as session:
            if not allow_duplicate:
                refuse_duplicate(session, job_spec)
            _adopt_payload(rt, session, job_spec)
            _, ids = create_jobs(session, job_spec, 1, launch=False)
            _fail_if_too_big(rt, session, job_spec, col(Job.id).in_(ids))
    _route(rt, job_spec.backend)
    return {"job_ids": ids, "launch_id": None}


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
        kick_dispatch(rt)
    return {"submitted": ids, "known": len(specs) - len(ids)}


@operation
def launch(rt: Runtime, spec: dict[str, Any], num_jobs: int) -> dict[str, Any]:
    """Store N replicas PENDING in one statement and route as many as GPUs allow."""
    with payload_store.dropped_if_refused(rt.redis, rt.engine, spec.get("payload_key")):
        job_spec = JobSpec.parse(spec)
        _check_preflight(rt, job_spec)
        rt.check_broker()  # refuse before storing anything when the broker is unreachable
        with rt.session() as session:
            _adopt_payload(rt, session, job_spec)
            launch_id, ids = create_jobs(session, job_spec, num_jobs, launch=True)
            _fail_if_too_big(rt, session, job_spec, col(Job.launch_id) == launch_id)
    _route(rt, job_spec.backend)
    return {"job_ids": ids, "launch_id": launch_id}


@operation
def dispatch(rt: Runtime) -> dict[str, Any]:
    from scheduler.dispatch.allocator import Dispatcher

    return {"routed": Dispatcher(rt).dispatch()}
