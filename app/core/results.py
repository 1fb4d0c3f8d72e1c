"""A function job's result: data that the job wrote, read by gpuq as data.

The runner (adapters/runner.py, which writes this format without importing gpuq) writes
one file or object per replica:

    GPQR1\\n
    {"ok": true|false, "type": "...", "message": "...", "traceback": "..."}\\n
    <pickled bytes: the value when ok, else the exception (empty when it does not pickle)>

gpuq's processes (a GPU worker, the control worker syncing a batch backend) read only the
JSON status line, bounded in size, to learn whether the job succeeded; they store the whole
result framed, opaque, under a purpose that says its content is the job's own
(payloads.RESULT, bound to the job's result key). Only the client that asked
(`JobHandle.result()`) unpickles the value: it runs that job's code anyway. So whatever a
job or a compute node writes there, no gpuq process ever unpickles it, and gpuq never
signs it as anything a client would accept as a payload.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.core import keys, payloads
from app.core.errors import PayloadError

if TYPE_CHECKING:
    import redis

MAGIC = b"GPQR1\n"
MAX_STATUS_BYTES = 64 * 1024  # the runner truncates messages and tracebacks to fit


@dataclass(frozen=True)
class Status:
    """Whether a function job succeeded, as its runner said."""

    ok: bool
    type: str = ""
    message: str = ""
    traceback: str = ""


class NotAResult(ValueError):
    """Bytes that are not a result in the runner's format."""


def split(data: bytes) -> tuple[Status, bytes]:
    """The status of a result and its pickled part (left pickled); NotAResult when the bytes
    are not in the runner's format. Reads at most MAX_STATUS_BYTES as JSON."""
    if not data.startswith(MAGIC):
        raise NotAResult("it is not in the format of gpuq's runner")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_STATUS_BYTES + 1)
    if end < 0:
        raise NotAResult(f"its status line is missing or over {MAX_STATUS_BYTES:,} bytes")
    try:
        raw = json.loads(data[len(MAGIC):end])
    except ValueError:
        raise NotAResult("its status line is not JSON") from None
    if (not isinstance(raw, dict) or not isinstance(raw.get("ok"), bool)
            or not all(isinstance(raw.get(k, ""), str)
                       for k in ("type", "message", "traceback"))):
        raise NotAResult("its status line is not a status")
    status = Status(raw["ok"], raw.get("type", ""), raw.get("message", ""),
                    raw.get("traceback", ""))
    return status, data[end + 1:]


def route(r: redis.Redis, job_id: int, data: bytes, *, limit_bytes: int,
          secret: str | None, keep_s: int) -> str | None:
    """Keep a function job's result (written by the runner, local or batch) for `result()`,
    unread but for its status; return why the job failed, if it did."""
    if len(data) > limit_bytes:
        return (f"result is {len(data):,} bytes, over GPUQ_MAX_RESULT_BYTES "
                f"({limit_bytes:,}); return a path to large data instead")
    try:
        status, _ = split(data)
    except NotAResult as e:
        return f"result refused: {e}"
    r.set(keys.result(job_id), payloads.frame(data, 2**62, secret, key=payloads.result_binding(
        job_id), purpose=payloads.RESULT), ex=keep_s)
    return None if status.ok else f"raised {status.type}: {status.message}"


def load(data: bytes, job_id: int, secret: str | None) -> tuple[Status, bytes]:
    """A stored result's status and pickled part, once its frame verifies for this job."""
    body = payloads.unframe(data, secret, key=payloads.result_binding(job_id),
                            purpose=payloads.RESULT)
    try:
        return split(body)
    except NotAResult as e:
        raise PayloadError(f"result of job {job_id} refused: {e}") from None
