"""Payload frames: a launch's payload is stored once (claim check), as the bytes framed here;
a function job's result is stored the same way, opaque.

The client writes payloads to Redis; the launch's transaction copies them into the database,
which keeps them while a replica may run, and Redis caches them (app/store/payload_store.py).

A frame is a small header, then the body: pickled bytes, gzipped above 4 KiB. The header
names the format version, the compression, the body's length before compression and a
digest, so a truncated, corrupted or foreign value is refused on load instead of being
unpickled, and a compressed body is never inflated past the length it declares.

The digest covers the magic, the flags, the length, the frame's purpose and the key it is
stored under, then the body: a frame copied to another key, or made for another purpose, is
refused. Without a shared secret it is a SHA-256 (it catches damage and misplacement, not
forgery); with GPUQ_SECRET it is an HMAC-SHA256 with a key derived from the secret for that
purpose alone, and a reader holding the secret refuses anything that does not verify:
whoever can write to Redis but does not know the secret cannot make a worker unpickle their
bytes, nor move one job's payload (its command, its secrets) under another's key.

Results are data (app/core/results.py): gpuq processes store them framed for the client
that asked, under a purpose that says their content is the job's own and unauthenticated,
and never unpickle them.
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
from app.core.signing import derive_key

if TYPE_CHECKING:
    import redis

MAGIC = b"GPQ2"
OLD_MAGICS = (b"GPQ1",)
GZIP_ABOVE_BYTES = 4096
# magic, flags, length of the body before compression, digest
_HEADER = struct.Struct(">4sBQ32s")
GZIPPED = 1
SIGNED = 2  # the digest is an HMAC with a key derived from the secret, not a plain SHA-256
SECRET_SETTING = "GPUQ_SECRET"
PAYLOAD = "gpuq payload v2"  # a launch's payload, written by the client that submitted it
RESULT = "gpuq result v2"  # a job's result: content written by the job, not authenticated
# However small its stored form, a frame never inflates past this many times its limit.
INFLATE_FACTOR = 16
MAX_INFLATED_BYTES = 2**30  # when a reader gives no limit


def result_binding(job_id: int) -> str:
    """What a result's frame is bound to: its key, and what its content is."""
    return f"{keys.result(job_id)}: result of job {job_id}, unauthenticated content"


def _digest(purpose: str, key: str, flags: int, length: int, body: bytes,
            secret: str | None) -> bytes:
    binding = purpose.encode() + b"\0" + key.encode() + b"\0"
    head = MAGIC + bytes([flags]) + length.to_bytes(8, "big")
    if flags & SIGNED:
        assert secret is not None
        return hmac.new(derive_key(secret, purpose), head + binding + body,
                        hashlib.sha256).digest()
    return hashlib.sha256(head + binding + body).digest()


def pack(value: Any, limit_bytes: int, secret: str | None = None, *, key: str) -> bytes:
    """Pickle, maybe gzip, and frame a value for `key`; refuse it above `limit_bytes`
    stored."""
    return frame(cloudpickle.dumps(value), limit_bytes, secret, key=key)


def frame(body: bytes, limit_bytes: int, secret: str | None = None, *, key: str,
          purpose: str = PAYLOAD) -> bytes:
    """Maybe gzip, then frame bytes for `key` and `purpose` (signed when a secret is
    given); refuse them above `limit_bytes` stored."""
    flags = SIGNED if secret else 0
    length = len(body)
    if length > INFLATE_FACTOR * limit_bytes:
        raise PayloadTooLarge(f"{length:,} bytes before compression, over {INFLATE_FACTOR} "
                              f"times the limit of {limit_bytes:,}; pass large data by path "
                              "instead")
    if length > GZIP_ABOVE_BYTES:
        compressor = zlib.compressobj(1, wbits=16 + zlib.MAX_WBITS)  # gzip format
        body = compressor.compress(body) + compressor.flush()
        flags |= GZIPPED
    digest = _digest(purpose, key, flags, length, body, secret)
    data = _HEADER.pack(MAGIC, flags, length, digest) + body
    if len(data) > limit_bytes:
        raise PayloadTooLarge(
            f"{len(data):,} bytes after compression, over the limit of {limit_bytes:,}; "
            "pass large data by path instead")
    return data


def unpack(data: bytes, secret: str | None = None, limit_bytes: int | None = None, *,
           key: str) -> Any:
    """The value framed by `pack` for `key`; PayloadError when it is not intact, not
    authentic, or framed for another key."""
    body = unframe(data, secret, limit_bytes, key=key)
    try:
        return cloudpickle.loads(body)
    except Exception as e:
        raise PayloadError(f"payload does not unpickle here: {type(e).__name__}: {e}") from e


def unframe(data: bytes, secret: str | None = None, limit_bytes: int | None = None, *,
            key: str, purpose: str = PAYLOAD) -> bytes:
    """The bytes inside a frame; PayloadError when it is not intact, not framed for `key`
    and `purpose`, not signed with `secret` (when one is given), over `limit_bytes`, or
    inflating past its declared length or INFLATE_FACTOR times `limit_bytes`."""
    if limit_bytes is not None and len(data) > limit_bytes:
        raise PayloadError(f"stored payload is {len(data):,} bytes, over the limit of "
                           f"{limit_bytes:,}; raise GPUQ_MAX_PAYLOAD_BYTES if it is meant")
    if data[:4] in OLD_MAGICS:
        raise PayloadError(f"payload refused: it was stored by an older gpuq (format "
                           f"{data[:4].decode()}), before frames were bound to their key; "
                           "submit it again")
    if len(data) < _HEADER.size:
        raise PayloadError("payload is truncated: shorter than its header")
    magic, flags, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PayloadError(f"not a gpuq payload of this version (header {magic!r})")
    if flags & ~(GZIPPED | SIGNED):
        raise PayloadError(f"not a gpuq payload of this version (flags {flags:#x})")
    body = data[_HEADER.size:]
    _authenticate(purpose, key, flags, length, body, digest, secret)
    inflated_limit = (MAX_INFLATED_BYTES if limit_bytes is None
                      else INFLATE_FACTOR * limit_bytes)
    if length > inflated_limit:
        raise PayloadError(f"payload refused: it declares {length:,} bytes uncompressed, over "
                           f"the limit of {inflated_limit:,}")
    if not flags & GZIPPED:
        if len(body) != length:
            raise PayloadError("payload is corrupted: its length does not match its header")
        return body
    return _decompress(body, length)


def _authenticate(purpose: str, key: str, flags: int, length: int, body: bytes,
                  digest: bytes, secret: str | None) -> None:
    if secret and not flags & SIGNED:
        raise PayloadNotAuthentic(
            f"payload refused: it is not signed, and this worker has {SECRET_SETTING} set; "
            f"submit with the same {SECRET_SETTING} as the workers")
    if flags & SIGNED and not secret:
        raise PayloadNotAuthentic(
            f"payload refused: it is signed, but {SECRET_SETTING} is not set here; set the "
            "same secret on every client and worker")
    if not hmac.compare_digest(_digest(purpose, key, flags, length, body, secret), digest):
        if flags & SIGNED:
            raise PayloadNotAuthentic(
                f"payload refused: its signature does not verify with {SECRET_SETTING} for "
                f"{key} (tampered with, copied from another key, or signed with another "
                "secret)")
        raise PayloadError(f"payload is corrupted: its checksum does not match (damaged, or "
                           f"not stored for {key})")


def _decompress(body: bytes, length: int) -> bytes:
    """Inflate at most `length` + 1 bytes: a body that inflates past the length its header
    declares (a gzip bomb) is refused without ever being held whole."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = decompressor.decompress(body, length + 1)
    except zlib.error as e:
        raise PayloadError(f"payload is corrupted: {e}") from e
    if len(out) > length:
        raise PayloadError(f"payload refused: it inflates past the {length:,} bytes its "
                           "header declares")
    if (len(out) != length or not decompressor.eof or decompressor.unused_data
            or decompressor.unconsumed_tail):
        raise PayloadError("payload is corrupted: its compressed body is incomplete")
    return out


def store(r: redis.Redis, value: Any, ttl_s: int, limit_bytes: int, kind: str = "launch",
          secret: str | None = None) -> str:
    """Store a value once, framed for its key (signed when a secret is given); return the
    key."""
    key = keys.new_payload(kind)
    r.set(key, pack(value, limit_bytes, secret, key=key), ex=ttl_s)
    return key


def load(r: redis.Redis, key: str, secret: str | None = None,
         limit_bytes: int | None = None) -> Any:
    """A value stored in Redis, checked (and authenticated when a secret is given) before
    unpickling. Workers read through app/store/payload_store.py, which falls back to the
    database."""
    data = r.get(key)
    if data is None:
        raise PayloadError(f"payload {key} is gone (expired or deleted with its launch)")
    return unpack(bytes(data), secret, limit_bytes, key=key)  # type: ignore[arg-type]
