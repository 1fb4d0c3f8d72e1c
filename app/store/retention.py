"""Finished jobs are forgotten after GPUQ_KEEP_FINISHED_DAYS: their rows, events and edges,
the launches and payloads nothing refers to any more, and their files on every host.

The control worker prunes the database (`gpuq.prune`, every GPUQ_PRUNE_INTERVAL_S from
beat, or `gpuq db prune`), a thousand jobs per transaction so that no lock is held long,
and deletes at once the files of the pruned jobs that lie on its own host: each job's log,
tmux script and exit file, and run directory, and for batch jobs their results, payload
files and output files in the backend's store. A job that ran on another host has its
files there: each host's `gpuq worker` sweeps the files of jobs the database no longer has.
A job is pruned only once it ended (a terminal state) before the cut-off: nothing that
runs, waits or may still be restarted is touched. Ids are never reused, so no new job
takes a pruned job's files.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import redis
from sqlalchemy import Engine, delete, or_, select
from sqlmodel import Session, col

from app.core.backends import LOCAL, adapter_class
from app.core.paths import BatchStore, JobPaths, area_results, remove_owned
from app.core.settings import Settings
from app.core.states import TERMINAL
from app.store import counts
from app.store.models import Job, JobDependency, JobEvent, Launch, Payload

log = logging.getLogger(__name__)

CHUNK = 1000
_JOB_FILE = re.compile(r"^(\d+)\.(log|tmux\.sh|exit)$")  # under logs/
_RUN_DIR = re.compile(r"^(\d+)$")  # under run/


@dataclass
class Pruned:
    jobs: int = 0
    events: int = 0
    launches: int = 0
    payloads: int = 0
    files: int = 0  # files and directories deleted on this host


def prune_finished(engine: Engine, r: redis.Redis | None, before: float,
                   chunk: int = CHUNK, settings: Settings | None = None) -> Pruned:
    """Delete every job that ended before `before` (epoch seconds), with what hangs on it;
    with `settings`, also the files of those jobs that lie on this host, once their rows
    are gone."""
    pruned = Pruned()
    terminal = [s.value for s in TERMINAL]
    while True:
        with Session(engine) as session:
            rows = session.execute(
                select(col(Job.id), col(Job.launch_id), col(Job.payload_key), col(Job.state),
                       col(Job.backend), col(Job.rank), col(Job.backend_id), col(Job.owner))
                .where(col(Job.ended_at) < before, col(Job.state).in_(terminal))
                .order_by(col(Job.ended_at)).limit(chunk)).all()
            if not rows:
                return pruned
            ids = [row[0] for row in rows]
            launches = {row[1] for row in rows if row[1] is not None}
            keys = {row[2] for row in rows if row[2]}
            pruned.events += session.execute(  # type: ignore[attr-defined]
                delete(JobEvent).where(col(JobEvent.job_id).in_(ids))).rowcount
            session.execute(delete(JobDependency).where(or_(
                col(JobDependency.job_id).in_(ids), col(JobDependency.after_id).in_(ids))))
            pruned.jobs += session.execute(  # type: ignore[attr-defined]
                delete(Job).where(col(Job.id).in_(ids))).rowcount
            for (launch_id, owner, state), n in Counter(
                    (row[1], row[7], row[3]) for row in rows).items():
                counts.note(session, launch_id, owner, state, -n)
            empty = _unreferenced_launches(session, launches)
            if empty:
                keys |= {k for (k,) in session.execute(
                    select(col(Launch.payload_key)).where(col(Launch.id).in_(empty))) if k}
                pruned.launches += session.execute(  # type: ignore[attr-defined]
                    delete(Launch).where(col(Launch.id).in_(empty))).rowcount
                counts.forget_launches(session, empty)
            orphans = _unreferenced_payloads(session, keys)
            if orphans:
                pruned.payloads += session.execute(  # type: ignore[attr-defined]
                    delete(Payload).where(col(Payload.key).in_(orphans))).rowcount
            session.commit()
        if settings is not None:
            pruned.files += delete_files(settings, [Gone(*row[:2], *row[4:8]) for row in rows],
                                         empty, orphans)
        if orphans and r is not None:
            try:
                r.delete(*orphans)  # the cache of what is gone
            except redis.RedisError as e:  # it expires by itself
                log.warning("prune: payload cache not cleared (%s)", e)


@dataclass(frozen=True)
class Gone:
    """A pruned job, as much of it as names its files."""

    job_id: int
    launch_id: int | None
    backend: str
    rank: int
    backend_id: str | None
    owner: str = ""


def delete_files(settings: Settings, jobs: list[Gone], launches: list[int],
                 payloads: list[str]) -> int:
    """Delete what these pruned jobs (and their pruned `launches` and `payloads`) left on
    this host; how many files and directories."""
    doomed: list[Path] = []
    areas = 0  # files in owners' areas, removed through no link their accounts made
    for job in jobs:
        paths = JobPaths(settings.home, job.job_id)
        doomed += [paths.log, paths.tmux_script, paths.tmux_exit, paths.run_dir]
    batch = sorted({job.backend for job in jobs if job.backend != LOCAL})
    for backend in batch:
        try:
            adapter = adapter_class(backend)
        except ImportError as e:  # its SDK is not installed here: nothing of it is here
            log.debug("prune: %s files left to their host (%s)", backend, e)
            continue
        store = BatchStore(adapter.store_dir(settings))
        for job in (j for j in jobs if j.backend == backend):
            doomed.append(store.results(None, job.job_id) if job.launch_id is None
                          else store.result(job.launch_id, job.job_id, job.rank))
            output, _ = adapter.output(settings, Job(
                id=job.job_id, launch_id=job.launch_id, rank=job.rank, backend=backend,
                backend_id=job.backend_id, command="", submitted_at=0.0))
            if output is not None:
                doomed.append(output)
            if job.owner:
                area = adapter.store_dir(settings) / "users" / job.owner
                areas += remove_owned(area, area_results(job.launch_id, job.job_id),
                                      f"{job.rank}.pkl")
                if job.backend_id:
                    areas += remove_owned(area, f"{job.backend_id}.out")
        doomed += [store.results(launch, 0) for launch in launches]
        doomed += [store.payload(key) for key in payloads]
    return sum(_delete(path) for path in doomed) + areas


def _delete(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    except OSError as e:  # left for the host's sweep
        log.warning("prune: %s not deleted (%s)", path, e)
        return False
    return True


def _unreferenced_launches(session: Session, launches: set[int]) -> list[int]:
    if not launches:
        return []
    kept = {i for (i,) in session.execute(
        select(col(Job.launch_id)).where(col(Job.launch_id).in_(launches)).distinct())}
    return sorted(launches - kept)


def _unreferenced_payloads(session: Session, keys: set[str]) -> list[str]:
    if not keys:
        return []
    used = {k for (k,) in session.execute(
        select(col(Job.payload_key)).where(col(Job.payload_key).in_(keys)).distinct())}
    used |= {k for (k,) in session.execute(
        select(col(Launch.payload_key)).where(col(Launch.payload_key).in_(keys)).distinct())}
    return sorted(keys - used)


def _file_job_ids(home: Path, older_than_s: float) -> dict[int, list[Path]]:
    """The job files under a gpuq home last written over `older_than_s` ago, by job id."""
    found: dict[int, list[Path]] = {}
    old = time.time() - older_than_s
    logs, runs = home / "logs", home / "run"
    candidates = [*(logs.iterdir() if logs.is_dir() else ()),
                  *(runs.iterdir() if runs.is_dir() else ())]
    for path in candidates:
        match = (_JOB_FILE if path.parent == logs else _RUN_DIR).match(path.name)
        if match is None:
            continue
        try:
            if path.stat().st_mtime > old:
                continue
        except OSError:
            continue
        found.setdefault(int(match.group(1)), []).append(path)
    return found


def sweep_files(engine: Engine, home: Path, older_than_s: float) -> int:
    """Delete this host's files of jobs the database no longer has; how many jobs' files.

    Only files last written over `older_than_s` (the retention period) ago: a pruned job
    ended before that, so a younger file belongs to a job whose row may be being written."""
    files = _file_job_ids(home, older_than_s)
    ids = sorted(files)
    gone = 0
    for start in range(0, len(ids), CHUNK):
        page = ids[start:start + CHUNK]
        with Session(engine) as session:
            known = {i for (i,) in session.execute(
                select(col(Job.id)).where(col(Job.id).in_(page)))}
        for job_id in page:
            if job_id in known:
                continue
            gone += 1
            for path in files[job_id]:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
    return gone

