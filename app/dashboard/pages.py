"""Server-rendered pages, and the fragments of them that the page script refreshes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from app.core.states import JobState
from app.dashboard import present
from app.dashboard.api import client_of
from app.ops.read import MAX_PAGE, SORT_KEYS
from app.store.accounting import GROUPS
from app.store.spec import MAX_ID

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
templates.env.globals.update(bar_segments=present.bar_segments, memory_pct=present.memory_pct)
templates.env.filters["clock"] = present.clock
router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)
RECENT_FAILURES = 10
# Columns of the jobs table: (label, sort key or None).
JOB_COLUMNS = [("id", "id"), ("name", "name"), ("user", None), ("status", "status"),
               ("gpus", "gpus"), ("host", "host"), ("priority", "priority"),
               ("submitted", "submitted"), ("duration", None), ("exit", "exit_code"),
               ("restarts", "restarts"), ("reason", None)]


def _call(request: Request, op: str, **kwargs: Any) -> dict[str, Any]:
    return client_of(request).call(op, **kwargs)


def _render(request: Request, name: str, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context)


@router.get("/")
def overview(request: Request) -> HTMLResponse:
    return _render(request, "overview.html", page="overview", **_overview(request))


@router.get("/partials/overview")
def overview_fragment(request: Request) -> HTMLResponse:
    return _render(request, "_overview.html", **_overview(request))


def _overview(request: Request) -> dict[str, Any]:
    launches = _call(request, "launches")["launches"][:20]
    failures: list[dict[str, Any]] = []
    for state in present.FAILURE_STATES:
        failures += _call(request, "queue", status=state.value, limit=RECENT_FAILURES)["jobs"]
    failures.sort(key=lambda row: row["ended_at"] or row["submitted_at"] or "", reverse=True)
    counts = _call(request, "status")["counts"]
    return {"launches": launches, "failures": failures[:RECENT_FAILURES], "counts": counts}


@router.get("/gpus")
def gpus(request: Request) -> HTMLResponse:
    return _render(request, "gpus.html", page="gpus", **_gpus(request))


@router.get("/partials/gpus")
def gpus_fragment(request: Request) -> HTMLResponse:
    return _render(request, "_gpus.html", **_gpus(request))


def _gpus(request: Request) -> dict[str, Any]:
    out = _call(request, "status")
    now = time.time()
    interval = request.app.state.settings.monitor_interval_s
    for host in out["hosts"]:
        for gpu in host["gpus"]:
            gpu["stale"] = present.is_stale(gpu, now, interval)
            gpu["age_s"] = present.reading_age_s(gpu, now)
    return out


@router.get("/jobs")
def jobs(request: Request, status: str | None = None,
         launch_id: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
         name: str | None = None, sort: str | None = None,
         offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
         limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50) -> HTMLResponse:
    context = _jobs(request, status, launch_id, name, sort, offset, limit)
    return _render(request, "jobs.html", page="jobs", **context)


@router.get("/partials/jobs")
def jobs_fragment(request: Request, status: str | None = None,
                  launch_id: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
                  name: str | None = None, sort: str | None = None,
                  offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
                  limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50) -> HTMLResponse:
    return _render(request, "_jobs.html",
                   **_jobs(request, status, launch_id, name, sort, offset, limit))


def _jobs(request: Request, status: str | None, launch_id: int | None, name: str | None,
          sort: str | None, offset: int, limit: int) -> dict[str, Any]:
    filters = {"status": status or None, "launch_id": launch_id, "name": name or None}
    out = _call(request, "queue", **filters, sort=sort or None, offset=offset, limit=limit)
    launch = None
    if launch_id is not None:
        found = _call(request, "launches", launch_id=launch_id)["launches"][0]
        launch = found

    def link(**change: Any) -> str:
        params = {**filters, "sort": sort, "offset": offset, "limit": limit, **change}
        return "?" + urlencode({k: v for k, v in params.items() if v not in (None, "")})

    return {"rows": out["jobs"], "total": out["total"], "filters": filters, "sort": sort,
            "offset": offset, "limit": limit, "link": link, "launch": launch,
            "columns": JOB_COLUMNS, "states": [s.value for s in JobState],
            "sort_keys": list(SORT_KEYS),
            "query": link()[1:]}


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: int) -> HTMLResponse:
    job = _job(request, job_id)
    return _render(request, "job.html", page="jobs", job=job)


@router.get("/partials/jobs/{job_id}")
def job_fragment(request: Request, job_id: int) -> HTMLResponse:
    return _render(request, "_job.html", job=_job(request, job_id))


def _job(request: Request, job_id: int) -> dict[str, Any]:
    job = _call(request, "job", job_id=job_id)
    job["env"] = present.mask_env(job["env"])
    job["terminal"] = JobState(job["status"]).terminal
    if job["status"] == JobState.PENDING.value:
        job["why"] = _call(request, "why", job_id=job_id)
    return job


@router.get("/usage")
def usage(request: Request, since: Annotated[str, Query(max_length=32)] = "7d",
          by: Annotated[str, Query(max_length=16)] = "user") -> HTMLResponse:
    return _render(request, "usage.html", page="usage", **_usage(request, since, by))


@router.get("/partials/usage")
def usage_fragment(request: Request, since: Annotated[str, Query(max_length=32)] = "7d",
                   by: Annotated[str, Query(max_length=16)] = "user") -> HTMLResponse:
    return _render(request, "_usage.html", **_usage(request, since, by))


def _usage(request: Request, since: str, by: str) -> dict[str, Any]:
    """The `report` operation's groups (a named user's own attempts only)."""
    return {"report": _call(request, "report", since=since, by=by), "since": since,
            "choices": list(GROUPS), "query": urlencode({"since": since, "by": by})}
