"""The JSON API under /api: thin routes over the operations layer, through the Client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from app.client import Client
from app.core.identity import Actor
from app.core.states import JobState
from app.dashboard import present
from app.dashboard.bodies import absolute_workdir, check_specs
from app.dashboard.schemas import ErrorBody, LaunchRequest, SubmitRequest
from app.ops.read import MAX_PAGE, SORT_KEYS
from app.ops.rows import (
    CancelResult,
    JobDetail,
    JobPage,
    Launches,
    LaunchRow,
    LimitsTable,
    Logs,
    Report,
    Status,
    Submitted,
    Why,
)
from app.ops.visibility import check_sees_everyone
from app.store.accounting import GROUPS, SPAN_PATTERN
from app.store.spec import MAX_ID

# Refusals every route may answer with (app.dashboard.app.HTTP_STATUS).
REFUSALS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "Refused: the message names the fix."),
        (403, "Another user's job or launch, or what names every user (limits, metrics): "
              "a named user sees only their own."),
        (404, "No such job or launch."),
        (503, "Redis or the control worker cannot be reached."))}
SUBMIT_REFUSALS: dict[int | str, dict[str, Any]] = {
    **REFUSALS, 409: {"model": ErrorBody, "description": "An identical job has not ended."},
    413: {"model": ErrorBody, "description": "The payload is too large."}}
LOG_POLL_S = 0.3
KEEPALIVE_S = 15.0
# A stream outlives the request that checked its token: ask again this often, so that a
# revoked or expired token stops reading a log within seconds.
TOKEN_RECHECK_S = 2.0

JobId = Annotated[int, Path(ge=1, le=MAX_ID)]
LaunchId = Annotated[int, Path(ge=1, le=MAX_ID)]
ByteOffset = Annotated[int, Query(ge=0, le=2**62, description="Byte offset into the log.")]
LineCount = Annotated[int | None, Query(ge=0, le=2**31, description="A number of lines.")]

router = APIRouter(prefix="/api", responses=REFUSALS)


def actor_of(request: Request) -> Actor | None:
    """Whoever the request's token names (the auth middleware sets request.state.actor;
    none set: the stack's owner)."""
    return getattr(request.state, "actor", None)


def client_of(request: Request) -> Client:
    """The dashboard's client, acting for whoever the request's token names."""
    client: Client = request.app.state.client
    actor = actor_of(request)
    return client if actor is None else client.acting_for(actor)


@router.get("/jobs", response_model=JobPage, tags=["jobs"])
def list_jobs(
    request: Request,
    status: JobState | None = None,
    launch_id: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    name: Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    sort: Annotated[str | None, Query(
        pattern=rf"^-?({'|'.join(SORT_KEYS)})$",
        description="A column, `-` first for descending; newest first when unset.")] = None,
) -> dict[str, Any]:
    """A page of jobs, as `gpuq queue`."""
    out = client_of(request).call("queue", status=status.value if status else None,
                                  launch_id=launch_id, name=name or None, limit=limit,
                                  offset=offset, sort=sort)
    return {**out, "limit": limit, "offset": offset}


@router.get("/jobs/{job_id}", response_model=JobDetail, tags=["jobs"])
def get_job(request: Request, job_id: JobId) -> dict[str, Any]:
    """One job with its events, oldest first; secrets in its environment masked."""
    job = client_of(request).call("job", job_id=job_id)
    job["env"] = present.mask_env(job["env"])
    return job


@router.post("/jobs", response_model=Submitted, status_code=201, tags=["jobs"],
             responses=SUBMIT_REFUSALS)
def submit_job(request: Request, body: SubmitRequest) -> dict[str, Any]:
    """Queue one job, as `gpuq submit`."""
    options = body.model_dump(exclude={"allow_duplicate"})
    absolute_workdir(options["workdir"])
    handle = client_of(request).submit(options.pop("command"),
                                       allow_duplicate=body.allow_duplicate, **options)
    return {"job_ids": [handle.id], "launch_id": None}


@router.get("/jobs/{job_id}/why", response_model=Why, tags=["jobs"])
def why_job(request: Request, job_id: JobId) -> dict[str, Any]:
    """Why a job is PENDING, as a code and a sentence (`gpuq why`)."""
    return client_of(request).call("why", job_id=job_id)


@router.get("/limits", response_model=LimitsTable, tags=["gpus"])
def get_limits(request: Request) -> dict[str, Any]:
    """Limits, weights, GPUs running, jobs pending and fair-share usage per user and
    project (`gpuq limits`): the stack owner's and admins' only."""
    check_sees_everyone(actor_of(request), "the limits and usage of every user")
    return client_of(request).call("limits_table")


@router.post("/jobs/{job_id}/cancel", response_model=CancelResult, tags=["jobs"])
def cancel_job(request: Request, job_id: JobId) -> dict[str, Any]:
    """Cancel one job: a waiting one ends now, a running one is told to stop."""
    return client_of(request).call("cancel", ids=[job_id])


@router.get("/jobs/{job_id}/logs", response_model=Logs, tags=["logs"])
def get_logs(request: Request, job_id: JobId, offset: ByteOffset = 0,
             head: LineCount = None, tail: LineCount = None) -> dict[str, Any]:
    """Up to 1 MiB of a job's log from `offset` (or from the first of its last `tail`
    lines; ended after `head` lines), and the offset to continue from."""
    return client_of(request).call("logs", job_id=job_id, offset=offset, head=head, tail=tail)


@router.get("/jobs/{job_id}/logs/stream", tags=["logs"], response_class=StreamingResponse,
            responses={200: {"description": "Server-sent events: `log` with "
                             "{text, offset} as the log grows, `end` with {status} once the "
                             "job has ended and the log is read, `closed` with {reason} "
                             "once the token is revoked or expires.",
                             "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
async def follow_logs(request: Request, job_id: JobId, offset: ByteOffset = 0
                      ) -> StreamingResponse:
    """Follow a job's log, as `gpuq logs --follow`."""
    client = client_of(request)
    first = await run_in_threadpool(client.call, "logs", job_id=job_id, offset=offset)
    return StreamingResponse(_log_events(request, client, job_id, first),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _token_holds(request: Request) -> bool:
    """Whether the request's token still names its actor (no recheck set: no token asked)."""
    recheck = getattr(request.state, "recheck", None)
    return recheck is None or bool(await run_in_threadpool(recheck))


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def _log_events(request: Request, client: Client, job_id: int,
                      out: dict[str, Any]) -> AsyncIterator[str]:
    idle_s = 0.0
    checked_at = time.monotonic()
    while True:
        if time.monotonic() - checked_at >= TOKEN_RECHECK_S:
            checked_at = time.monotonic()
            if not await _token_holds(request):
                yield _event("closed", {"reason": "the token was revoked or has expired"})
                return
        if out["text"]:
            idle_s = 0.0
            yield _event("log", {"text": out["text"], "offset": out["offset"]})
        elif JobState(out["status"]).terminal:
            yield _event("end", {"status": out["status"]})
            return
        else:
            if await request.is_disconnected():
                return
            if idle_s >= KEEPALIVE_S:
                idle_s = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(LOG_POLL_S)
            idle_s += LOG_POLL_S
        out = await run_in_threadpool(client.call, "logs", job_id=job_id, offset=out["offset"])


@router.get("/launches", response_model=Launches, tags=["launches"])
def list_launches(request: Request) -> dict[str, Any]:
    """Recent launches with their replicas' counts per state, as `gpuq launches`."""
    rows = client_of(request).call("launches")["launches"]
    return {"launches": rows}


@router.get("/launches/{launch_id}", response_model=LaunchRow, tags=["launches"])
def get_launch(request: Request, launch_id: LaunchId) -> dict[str, Any]:
    row = client_of(request).call("launches", launch_id=launch_id)["launches"][0]
    return row


@router.post("/launches", response_model=Submitted, status_code=201, tags=["launches"],
             responses=SUBMIT_REFUSALS)
def launch_jobs(request: Request, body: LaunchRequest) -> dict[str, Any]:
    """Queue `num_jobs` replicas of one command, as `gpuq launch`."""
    options = body.model_dump(exclude={"num_jobs"})
    absolute_workdir(options["workdir"])
    handle = client_of(request).launch(options.pop("command"), body.num_jobs, **options)
    return {"job_ids": handle.job_ids, "launch_id": handle.id}


@router.post("/launches/{launch_id}/cancel", response_model=CancelResult, tags=["launches"])
def cancel_launch(request: Request, launch_id: LaunchId) -> dict[str, Any]:
    """Cancel every replica of a launch that has not ended."""
    return client_of(request).call("cancel", launch_id=launch_id)


@router.get("/status", response_model=Status, tags=["gpus"])
def get_status(request: Request) -> dict[str, Any]:
    """Hosts, their GPUs (reading, worker, holding job) and job counts, as `gpuq status`."""
    out = client_of(request).call("status")
    for host in out["hosts"]:
        host["stale"] = host["workers_alive"] < len(host["gpus"])
    return out


@router.get("/report", response_model=Report, tags=["usage"])
def get_report(
    request: Request,
    since: Annotated[str, Query(max_length=32, pattern=SPAN_PATTERN,
                                description="7d, 12h, 30m, 90s or seconds.")] = "7d",
    by: Annotated[str, Query(pattern=f"^({'|'.join(GROUPS)})$")] = "user",
) -> dict[str, Any]:
    """GPU use of the attempts that ended within `since`, by user, project or launch, as
    `gpuq report` (a named user's own attempts only)."""
    return client_of(request).call("report", since=since, by=by)


@router.post("/ops/{name}", tags=["ops"], responses={
    200: {"description": "The operation's answer, as the local transport returns it."}})
def run_operation(request: Request,
                  name: Annotated[str, Path(max_length=64, pattern=r"^[a-z_]+$")],
                  kwargs: Annotated[dict[str, Any], Body(
                      description="The operation's named arguments.")]) -> dict[str, Any]:
    """Run any operation of the operations layer as the token's user: what the Python
    client and the CLI send over the http transport (GPUQ_URL)."""
    check_specs(kwargs)
    return client_of(request).call(name, **kwargs)
