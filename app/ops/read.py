"""Operations that read: queue, job, launches, logs, status."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import ColumnElement, false, func
from sqlmodel import col, select

from app.core.backends import adapter_class
from app.core.errors import (
    InvalidArguments,
    InvalidJobSpec,
    JobNotFound,
    LaunchNotFound,
)
from app.core.identity import Actor, sees_everyone
from app.core.logcap import head_bytes
from app.core.paths import JobPaths, NotOwned, open_owned
from app.core.states import JobState
from app.ops.registry import operation
from app.ops.rows import MAX_PAGE, JobDetail, JobRow, LaunchRow
from app.ops.visibility import (
    check_sees,
    check_sees_launch,
    hide_holders,
    visible,
)
from app.runtime import Runtime
from app.store import accounting, cluster, counts
from app.store.exits import recent_exits
from app.store.jobs import (
    get_jobs,
)
from app.store.models import Job, JobDependency, JobEvent, Launch
from app.store.spec import MAX_ID

log = logging.getLogger(__name__)


def storable(an_id: int) -> bool:
    """Whether an id fits the id columns; one that does not names nothing there is (and
    would overflow the database driver if it were asked for)."""
    return 1 <= an_id <= MAX_ID


def check_job_ids(ids: list[int]) -> None:
    """Refuse ids beyond the id columns as unknown, before any query carries them."""
    beyond = [i for i in ids if not storable(i)]
    if beyond:
        raise JobNotFound.for_ids(beyond)


def check_launch_id(launch_id: int) -> None:
    if not storable(launch_id):
        raise LaunchNotFound(f"no launch with id {launch_id}; `gpuq launches` lists them")


def filters(status: str | None, launch_id: int | None, name: str | None,
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
        where.append(col(Job.launch_id) == launch_id if storable(launch_id) else false())
    if name:
        where.append(col(Job.name) == name if _encodable(name) else false())
    if ids:
        where.append(col(Job.id).in_([i for i in ids if storable(i)]))
    return where


def _encodable(text: str) -> bool:
    """Whether text can be sent to the database: a name of bytes that are not UTF-8 (lone
    surrogates from a shell's argv) is no stored job's name."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


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




LOG_CHUNK_BYTES = 1 << 20


@operation
def queue(rt: Runtime, status: str | None = None, launch_id: int | None = None,
          name: str | None = None, ids: list[int] | None = None, limit: int = 50,
          offset: int = 0, sort: str | None = None, actor: Actor | None = None
          ) -> dict[str, Any]:
    """A page of the actor's jobs (every job for an admin; newest first; by rank within a
    launch; or by `sort`) and the total that match."""
    if not 0 < limit <= MAX_PAGE:
        raise InvalidJobSpec(f"--limit must be between 1 and {MAX_PAGE}")
    if offset < 0:
        raise InvalidArguments("offset counts rows to skip: 0 or more")
    mine = visible(actor)
    where = [*filters(status, launch_id, name, ids), *mine]
    order = _order(sort, launch_id)
    now = time.time()
    with rt.session() as session:
        if name or ids or mine:  # the kept counts are of every owner's jobs
            total = session.scalar(select(func.count()).select_from(Job).where(*where)) or 0
        elif launch_id is not None and not storable(launch_id):
            total = 0
        else:  # by state and launch: the kept counts, not a count of every row
            states = [JobState(status.upper()).value] if status else None
            total = counts.total(session, states, launch_id)
        jobs = list(session.exec(select(Job).where(*where).order_by(*order)
                                 .offset(offset).limit(limit)))
    reasons = pending_reasons(rt, jobs, actor)
    rows = [JobRow.of(job, now, reasons.get(job.id or 0)).dump() for job in jobs]
    return {"jobs": rows, "total": total}


# A page of the queue explains at most this many PENDING jobs (one pass that changes
# nothing, app/ops/shares.py); `gpuq why ID` explains any.
MAX_EXPLAINED = 500


def pending_reasons(rt: Runtime, jobs: list[Job], actor: Actor | None = None
                    ) -> dict[int, tuple[str, str]]:
    """Why each PENDING job of a page waits (code, sentence), as `gpuq why` says to
    `actor`; none when the cluster's state cannot be read (the page shows the stored
    reason)."""
    pending = [j for j in jobs if j.state == JobState.PENDING.value][:MAX_EXPLAINED]
    if not pending:
        return {}
    from scheduler.dispatch.explain import explain

    try:
        return {i: (r.code, r.text) for i, r in explain(rt, pending, actor).items()}
    except Exception as e:  # Redis away: the page is still worth showing
        log.warning("cannot say why jobs wait (%s: %s)", type(e).__name__, e)
        return {}


@operation
def job(rt: Runtime, job_id: int, actor: Actor | None = None) -> dict[str, Any]:
    """One job with its events, oldest first."""
    check_job_ids([job_id])
    with rt.session() as session:
        found = get_jobs(session, [job_id])[0]
        check_sees(actor, [found])
        events = session.exec(select(JobEvent).where(JobEvent.job_id == job_id)
                              .order_by(col(JobEvent.id)))
        after = sorted(session.scalars(select(JobDependency.after_id).join(
            Job, col(Job.id) == JobDependency.after_id).where(
            JobDependency.job_id == job_id, *visible(actor))))
        return JobDetail.of_job(found, time.time(), after, list(events),
                                accounting.of_job(session, job_id)).dump()


@operation
def launches(rt: Runtime, launch_id: int | None = None, actor: Actor | None = None
             ) -> dict[str, Any]:
    """The actor's launches (every launch for an admin) with their replica counts per
    state."""
    with rt.session() as session:
        query = select(Launch).order_by(col(Launch.id).desc()).limit(100)
        query = query.where(*visible(actor, Launch.owner))
        if launch_id is not None:
            check_launch_id(launch_id)
            query = select(Launch).where(Launch.id == launch_id)
        rows = list(session.exec(query))
        if launch_id is not None and not rows:
            raise LaunchNotFound(f"no launch with id {launch_id}; `gpuq queue` shows launch ids")
        for row in rows:
            check_sees_launch(actor, row)
        by_launch = counts.of_launches(session, [r.id for r in rows if r.id is not None])
    return {"launches": [LaunchRow.of(r, by_launch.get(r.id or 0, {})).dump() for r in rows]}




@operation
def logs(rt: Runtime, job_id: int, offset: int = 0, head: int | None = None,
         tail: int | None = None, actor: Actor | None = None) -> dict[str, Any]:
    """Up to 1 MiB of a job's log from byte `offset`, the offset to continue from, and the
    log's size now (`gpuq logs` reads on to it). `tail` starts at the first of the last
    `tail` lines instead; `head` ends the text after that many lines. A job whose backend
    keeps its output elsewhere gets a `where` naming the place."""
    _check_log_arguments(offset, head, tail)
    check_job_ids([job_id])
    with rt.session() as session:
        job = get_jobs(session, [job_id])[0]
    check_sees(actor, [job])
    state = job.state
    path: Path | None = JobPaths(rt.settings.home, job_id).log
    where = None
    if job.backend != "local":
        path, where = adapter_class(job.backend).output(rt.settings, job)
    data, size = b"", 0
    if path is not None:
        # A batch job's output may be in its owner's area: read only a plain file of the
        # area's account there, never through a link it made.
        with contextlib.suppress(FileNotFoundError, NotOwned), (
                open(path, "rb") if job.backend == "local"
                else open_owned(path.parent, path.name)) as f:
            size = os.fstat(f.fileno()).st_size
            if tail is not None:
                offset = tail_offset(f, size, tail)
            elif offset > size:  # its middle was dropped (a capped log) since that offset
                cut_at = head_bytes(rt.settings.log_max_bytes)
                offset = cut_at if size > cut_at else 0
            f.seek(offset)
            data = whole_characters(f.read(LOG_CHUNK_BYTES), LOG_CHUNK_BYTES)
    if head is not None:
        data = first_lines(data, head)
    return {"text": data.decode(errors="replace"), "offset": offset + len(data),
            "status": state, "where": where, "size": size}


def _check_log_arguments(offset: int, head: int | None, tail: int | None) -> None:
    if offset < 0:
        raise InvalidArguments("offset is a byte position in the log: 0 or more")
    if head is not None and tail is not None:
        raise InvalidArguments("--head and --tail cannot be used together; choose one")
    for name, lines in (("head", head), ("tail", tail)):
        if lines is not None and lines < 0:
            raise InvalidArguments(f"--{name} counts lines: 0 or more")


TAIL_BLOCK_BYTES = 1 << 16


def tail_offset(f: BinaryIO, size: int, lines: int) -> int:
    """Where the last `lines` lines of the file start (a last line without its newline is
    one), read backwards a block at a time."""
    end = size
    if size:
        f.seek(size - 1)
        end -= f.read(1) == b"\n"  # the last line's own newline starts no line
    found, pos = 0, end
    while pos > 0 and lines:
        start = max(0, pos - TAIL_BLOCK_BYTES)
        f.seek(start)
        block = f.read(pos - start)
        at = len(block)
        while (at := block.rfind(b"\n", 0, at)) >= 0:
            found += 1
            if found == lines:
                return start + at + 1
        pos = start
    return size if not lines else 0


def first_lines(data: bytes, lines: int) -> bytes:
    """`data` up to and with its `lines`-th newline."""
    at = -1
    for _ in range(lines):
        at = data.find(b"\n", at + 1)
        if at < 0:
            return data
    return data[:at + 1]


def whole_characters(data: bytes, full: int) -> bytes:
    """A chunk of `full` bytes less a UTF-8 character cut at its end (the next chunk starts
    with it): both halves would decode to replacement characters."""
    if len(data) < full:
        return data
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # ASCII or the first byte of a character
            length = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if length <= back else data[:-back]
    return data


@operation
def status(rt: Runtime, actor: Actor | None = None) -> dict[str, Any]:
    """Hosts and their GPUs (alive, held by which job), job counts per state, workers whose
    heartbeat stopped, recent exits of supervised programs (crash loops), and the
    addresses of Flower and the dashboard. A named user who is not an admin sees the
    counts of every job per state (how busy the stack is), the ids of the GPUs' holders
    that are their own jobs only, and no limits table (it names every user)."""
    r = rt.redis
    hosts = cluster.gpu_table(r)
    with rt.session() as session:
        totals = counts.totals(session)
        hide_holders(session, hosts, actor)
    from app.ops.shares import shares_table

    s = rt.settings
    # Per user and project: the owner's and admins' (a named user's own row: `gpuq limits`).
    limits = shares_table(rt, count_pending=False) if sees_everyone(actor) else None
    return {"hosts": hosts, "counts": totals, "limits": limits,
            "stale_workers": [f"{h['host']}/gpu{g['index']}" for h in hosts
                              for g in h["gpus"] if not g["alive"]],
            "programs": recent_exits(r),
            "flower": (f"http://{s.flower_address}:{s.flower_port}"
                       if _listening(s.flower_address, s.flower_port) else None),
            "dashboard": f"http://{s.dashboard_address}:{s.dashboard_port}"}


# A Flower that does not answer this fast is not shown (a stack run with --no-flower).
FLOWER_PROBE_S = 0.3


def _listening(address: str, port: int) -> bool:
    """Whether something accepts connections at address:port: Flower is optional, and a
    stack without it must not point users at an address where nothing answers."""
    host = "127.0.0.1" if address in ("0.0.0.0", "") else "::1" if address == "::" else address
    try:
        with socket.create_connection((host, port), timeout=FLOWER_PROBE_S):
            return True
    except OSError:
        return False
