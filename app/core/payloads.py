"""Payload frames: a launch's payload is stored once (claim check), as the bytes framed here.

The client writes them to Redis; the launch's transaction copies them into the database,
which keeps them while a replica may run, and Redis caches them (app/store/payload_store.py).

A stored payload is a small header, then the body: cloudpickle bytes, gzipped above 4 KiB.
The header names the format version, the compression and a digest, so a truncated,
corrupted or foreign value is refused on load instead of being unpickled. Without a shared
secret the digest is the body's SHA-256 (it catches damage, not forgery); with GPUQ_SECRET
it is an HMAC-SHA256 over the magic, the flags and the body, and a reader holding the
secret refuses anything that does not verify: whoever can write to Redis but does not know
the secret cannot make a worker unpickle their bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from typing import TYPE_CHECKING, Any

import cloudpickle

from app.core import keys
from app.core.errors import PayloadError, PayloadNotAuthentic, PayloadTooLarge

if TYPE_CHECKING:
    import redis

MAGIC = b"GPQ1"
GZIP_ABOVE_BYTES = 4096
_HEADER = struct.Struct(">4sB32s")  # magic, flags, digest of the stored body
GZIPPED = 1
SIGNED = 2  # the digest is an HMAC with the shared secret, not a plain SHA-256
SECRET_SETTING = "GPUQ_SECRET"


def _digest(flags: int, body: bytes, secret: str | None) -> bytes:
    if flags & SIGNED:
        assert secret is not None
        return hmac.new(secret.encode(), MAGIC + bytes([flags]) + body, hashlib.sha256).digest()
    return hashlib.sha256(body).digest()



def pack(value: Any, limit_bytes: int, secret: str | None = None) -> bytes:
    """Pickle, maybe gzip, and frame a value; refuse it above `limit_bytes` stored."""
    return frame(cloudpickle.dumps(value), limit_bytes, secret)


def frame(body: bytes, limit_bytes: int, secret: str | None = None) -> bytes:
    """Maybe gzip, then frame already pickled bytes (signed when a secret is given);
    refuse them above `limit_bytes`."""
    flags = SIGNED if secret else 0
    if len(body) > GZIP_ABOVE_BYTES:
        compressor = zlib.compressobj(1, wbits=16 + zlib.MAX_WBITS)  # gzip format
        body = compressor.compress(body) + compressor.flush()
        flags |= GZIPPED
    data = _HEADER.pack(MAGIC, flags, _digest(flags, body, secret)) + body
    if len(data) > limit_bytes:
        raise PayloadTooLarge(
            f"{len(data):,} bytes after compression, over the limit of {limit_bytes:,}; "
            "pass large data by path instead")
    return data


def unpack(data: bytes, secret: str | None = None, limit_bytes: int | None = None) -> Any:
    """The value framed by `pack`; PayloadError when it is not intact or not authentic."""
    body = unframe(data, secret, limit_bytes)
    try:
        return cloudpickle.loads(body)
    except Exception as e:
        raise PayloadError(f"payload does not unpickle here: {type(e).__name__}: {e}") from e


def unframe(data: bytes, secret: str | None = None, limit_bytes: int | None = None) -> bytes:
    """The pickled bytes inside a frame; PayloadError when it is not intact, not signed
    with `secret` (when one is given), or over `limit_bytes`."""
    if limit_bytes is not None and len(data) > limit_bytes:
        raise PayloadError(f"stored payload is {len(data):,} bytes, over the limit of "
                           f"{limit_bytes:,}; raise GPUQ_MAX_PAYLOAD_BYTES if it is meant")
    if len(data) < _HEADER.size:
        raise PayloadError("payload is truncated: shorter than its header")
    magic, flags, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PayloadError(f"not a gpuq payload of this version (header {magic!r})")
    if flags & ~(GZIPPED | SIGNED):
        raise PayloadError(f"not a gpuq payload of this version (flags {flags:#x})")
    body = data[_HEADER.size:]
    _authenticate(flags, body, digest, secret)
    return _decompress(body) if flags & GZIPPED else body


def _authenticate(flags: int, body: bytes, digest: bytes, secret: str | None) -> None:
    if secret and not flags & SIGNED:
        raise PayloadNotAuthentic(
            f"payload refused: it is not signed, and this worker has {SECRET_SETTING} set; "
            f"submit with the same {SECRET_SETTING} as the workers")
    if flags & SIGNED and not secret:
        raise PayloadNotAuthentic(
            f"payload refused: it is signed, but {SECRET_SETTING} is not set here; set the "
            "same secret on every client and worker")
    if not hmac.compare_digest(_digest(flags, body, secret), digest):
        if flags & SIGNED:
            raise PayloadNotAuthentic(
                f"payload refused: its signature does not verify with {SECRET_SETTING} "
                "(tampered with, or signed with another secret)")
        raise PayloadError("payload is corrupted: its checksum does not match")


def _decompress(body: bytes) -> bytes:
    try:
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = decompressor.decompress(body) + decompressor.flush()
    except zlib.error as e:
        raise PayloadError(f"payload is corrupted: {e}") from e
    if not decompressor.eof or decompressor.unused_data:
        raise PayloadError("payload is corrupted: its compressed body is incomplete")
    return out


def store(r: redis.Redis, value: Any, ttl_s: int, limit_bytes: int, kind: str = "launch",
          secret: str | None = None) -> str:
    """Store a value once (signed when a secret is given); return its key."""
    key = keys.new_payload(kind)
    r.set(key, pack(value, limit_bytes, secret), ex=ttl_s)
    return key



def load(r: redis.Redis, key: str, secret: str | None = None,
         limit_bytes: int | None = None) -> Any:
    """A value stored in Redis, checked (and authenticated when a secret is given) before
    unpickling. Workers read through app/store/payload_store.py, which falls back to the
    database."""
    data = r.get(key)
    if data is None:
        raise PayloadError(f"payload {key} is gone (expired or deleted with its launch)")
    return unpack(bytes(data), secret, limit_bytes)  # type: ignore[arg-type]


def route_result(r: redis.Redis, job_id: int, envelope: bytes, *, limit_bytes: int,
                 secret: str | None, keep_s: int) -> str | None:
    """Keep a function job's envelope (written by the runner, local or batch) for
    `result()`; return why the job failed, if it did."""
    if len(envelope) > limit_bytes:
        return (f"result is {len(envelope):,} bytes, over GPUQ_MAX_RESULT_BYTES "
                f"({limit_bytes:,}); return a path to large data instead")
    r.set(keys.result(job_id), frame(envelope, 2**62, secret), ex=keep_s)
    outer: dict[str, Any] = cloudpickle.loads(envelope)  # the value stays pickled inside
    return None if outer["ok"] else f"raised {outer['type']}: {outer['message']}"
