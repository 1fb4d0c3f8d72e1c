"""From a job row to the command that runs: its launch's payload, per-rank arguments,
and Python-function calls through the universal runner; then the function's result."""

from __future__ import annotations

import shlex
import shutil
import sys
from collections import OrderedDict
from typing import Any

import cloudpickle

from app.core import results, sealing
from app.core.paths import JobPaths
from app.runtime import Runtime
from app.store import payload_store
from app.store.models import Job


def resolve_command(rt: Runtime, job: Job) -> str:
    """The shell command of this replica; raises PayloadError when its payload is unusable."""
    if job.payload_key is None:
        return _substitute(job.command, job)
    payload = _load_cached(rt, job.payload_key)
    if payload["kind"] == "function":
        return _function_command(rt, job, payload)
    command = payload["command"]
    rank_args = payload.get("rank_args")
    if rank_args is not None:
        command = f"{command} {shlex.join(str(a) for a in rank_args[job.rank])}"
    return _substitute(command, job)


def job_secrets(rt: Runtime, job: Job) -> dict[str, str]:
    """The secret environment variables of a job: they travel in its payload only, sealed
    (app/core/sealing.py), and are unsealed here, where the job starts."""
    if job.payload_key is None:
        return {}
    return sealing.payload_secrets(_load_cached(rt, job.payload_key), rt.settings.secret,
                                   rt.settings.home)


_CACHE: OrderedDict[str, dict[str, Any]] = OrderedDict()
CACHED_PAYLOADS = 4


def _load_cached(rt: Runtime, key: str) -> dict[str, Any]:
    """A launch's payload, read once per worker: its replicas come to the same GPU in turn.
    Payloads never change under their key, so a cached copy is never stale. Redis first,
    then the database (which keeps every accepted launch's payload)."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    payload: dict[str, Any] = payload_store.load(
        rt.redis, rt.engine, key, cache_ttl_s=rt.settings.payload_ttl_s,
        secret=rt.settings.secret, limit_bytes=rt.settings.max_payload_bytes)
    _CACHE[key] = payload
    while len(_CACHE) > CACHED_PAYLOADS:
        _CACHE.popitem(last=False)
    return payload


def _substitute(command: str, job: Job) -> str:
    """`{rank}` and `{num_jobs}` in a command become this replica's values."""
    return command.replace("{rank}", str(job.rank)).replace("{num_jobs}", str(job.num_jobs))


def _function_command(rt: Runtime, job: Job, payload: dict[str, Any]) -> str:
    """Write this replica's call where the runner reads it; return the runner's command.

    The call stays pickled bytes here: the worker never unpickles user code."""
    assert job.id is not None
    paths = JobPaths(rt.settings.home, job.id)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"call": payload["call"]}
    items = payload.get("items")
    if items is not None:
        spec["item"] = items[job.rank]
    paths.call_file.write_bytes(cloudpickle.dumps(spec))
    paths.result_file.unlink(missing_ok=True)
    # The worker's interpreter runs the call: it has cloudpickle and gpuq installed.
    return (f"{shlex.quote(sys.executable)} -m adapters.runner "
            f"--payload-file {shlex.quote(str(paths.call_file))} "
            f"--result-file {shlex.quote(str(paths.result_file))}")


def collect_result(rt: Runtime, job: Job) -> str | None:
    """Store a function job's result for `result()`, read only for its JSON status (the
    value stays pickled: app/core/results.py); return why the job failed, if it did."""
    assert job.id is not None
    paths = JobPaths(rt.settings.home, job.id)
    try:
        data = paths.result_file.read_bytes()
    except FileNotFoundError:
        return None
    finally:
        shutil.rmtree(paths.run_dir, ignore_errors=True)
    return results.route(rt.redis, job.id, data, limit_bytes=rt.settings.max_result_bytes,
                         secret=rt.settings.secret, keep_s=rt.settings.keep_result_s)
