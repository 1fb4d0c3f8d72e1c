"""The payload store: a launch's payload is stored once in Redis (claim check).

A stored payload is a small header, then the body: cloudpickle bytes, gzipped above 4 KiB.
The header names the format version, the compression and the body's SHA-256, so a
truncated, corrupted or foreign value is refused on load instead of being unpickled.
"""

from __future__ import annotations

import gzip
import hashlib
import secrets
import struct
from typing import TYPE_CHECKING, Any

import cloudpickle

from app.errors import GpuqError, PayloadTooLarge

if TYPE_CHECKING:
    import redis

MAGIC = b"GPQ1"
GZIP_ABOVE_BYTES = 4096
_HEADER = struct.Struct(">4sB32s")  # magic, flags (1 = gzip), sha256 of the stored body


class PayloadError(GpuqError):
    code = "payload_error"


def payload_key(kind: str = "launch") -> str:
    return f"gpuq:payload:{kind}:{secrets.token_hex(8)}"


def pack(value: Any, limit_bytes: int) -> bytes:
    """Pickle, maybe gzip, and frame a value; refuse it above `limit_bytes` stored."""
    return frame(cloudpickle.dumps(value), limit_bytes)


def frame(body: bytes, limit_bytes: int) -> bytes:
    """Maybe gzip, then frame already pickled bytes; refuse them above `limit_bytes`."""
    flags = 0
    if len(body) > GZIP_ABOVE_BYTES:
        body = gzip.compress(body, compresslevel=1)
        flags = 1
    data = _HEADER.pack(MAGIC, flags, hashlib.sha256(body).digest()) + body
    if len(data) > limit_bytes:
        raise PayloadTooLarge(
            f"{len(data):,} bytes after compression, over the limit of {limit_bytes:,}; "
            "pass large data by path instead")
    return data


def unpack(data: bytes) -> Any:
    """The value framed by `pack`; PayloadError when it is not intact."""
    return cloudpickle.loads(unframe(data))


def unframe(data: bytes) -> bytes:
    """The pickled bytes inside a frame; PayloadError when it is not intact."""
    if len(data) < _HEADER.size:
        raise PayloadError("payload is truncated: shorter than its header")
    magic, flags, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PayloadError(f"not a gpuq payload of this version (header {magic!r})")
    body = data[_HEADER.size:]
    if hashlib.sha256(body).digest() != digest:
        raise PayloadError("payload is corrupted: its checksum does not match")
    if flags & 1:
        body = gzip.decompress(body)
    return body


def store(r: redis.Redis, value: Any, ttl_s: int, limit_bytes: int, kind: str = "launch"
          ) -> str:
    """Store a value once; return its key."""
    key = payload_key(kind)
    r.set(key, pack(value, limit_bytes), ex=ttl_s)
    return key


def result_key(job_id: int) -> str:
    return f"gpuq:result:{job_id}"


def load(r: redis.Redis, key: str) -> Any:
    data = r.get(key)
    if data is None:
        raise PayloadError(f"payload {key} is gone (expired or deleted with its launch)")
    return unpack(bytes(data))  # type: ignore[arg-type]
