"""Where a stored payload lives: durably in the database (table `payloads`), cached in Redis.

The client writes a payload's framed bytes to Redis (it may reach nothing else); the
operation that accepts the launch copies them into the database in the same transaction as
the launch's rows, so a launch is either whole or absent. Readers try Redis first, fall back
to the database and cache again what Redis lost: neither lost Redis data nor a queue wait
longer than the cache's TTL costs a launch its payload. The bytes are the same framed bytes
in both places (app/core/payloads.py checks them when they are unpacked).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete
from sqlmodel import Session

from app.core import keys, payloads
from app.core.errors import PayloadError, PayloadTooLarge
from app.store.models import Payload

if TYPE_CHECKING:
    import redis  # imported where a Redis error is caught: `gpuq queue` reads no Redis
    from sqlalchemy.engine import Engine

_KEY = re.compile(rf"{re.escape(keys.PREFIX)}:payload:[a-z]+:[0-9a-f]{{16}}")


def check_key(key: str) -> None:
    """Refuse anything but a key `keys.new_payload` makes: an operation must never copy
    (nor delete) another Redis key on a caller's word."""
    if not _KEY.fullmatch(key):
        raise PayloadError(f"{key!r} is not a payload key; store the payload with the client, "
                           "which names it")


def adopt(session: Session, r: redis.Redis, key: str, limit_bytes: int) -> None:
    """Copy the payload the client stored in Redis under `key` into the database, in the
    caller's transaction; refuse one that is missing, too large, or already adopted."""
    check_key(key)
    data = r.get(key)
    if data is None:
        raise PayloadError(f"payload {key} is not in Redis (expired, or removed when a "
                           "previous try was refused); submit again")
    if len(data) > limit_bytes:  # type: ignore[arg-type]
        raise PayloadTooLarge(f"payload is {len(data):,} bytes, over the limit of "  # type: ignore[arg-type]
                              f"{limit_bytes:,} (GPUQ_MAX_PAYLOAD_BYTES)")
    if session.get(Payload, key) is not None:
        raise PayloadError(f"payload {key} belongs to another launch already; "
                           "each launch stores its own")
    session.add(Payload(key=key, data=bytes(data), created_at=time.time()))  # type: ignore[arg-type]
    session.flush()


def adopted(engine: Engine, key: str) -> bool | None:
    """Whether a launch holds this payload in the database; None when that cannot be told."""
    try:
        with Session(engine) as session:
            return session.get(Payload, key) is not None
    except Exception:
        return None


@contextlib.contextmanager
def dropped_if_refused(r: redis.Redis, engine: Engine, key: object) -> Iterator[None]:
    """Remove the payload a request names from Redis when the request fails before a
    launch holds it in the database: then it surely was not accepted. Where that cannot
    be told (the database unreachable) the copy stays, and expires with its TTL."""
    try:
        yield
    except BaseException:
        if isinstance(key, str) and _KEY.fullmatch(key) and adopted(engine, key) is False:
            import redis

            with contextlib.suppress(redis.RedisError):
                r.delete(key)
        raise


def fetch(r: redis.Redis, engine: Engine, key: str, cache_ttl_s: int) -> bytes:
    """A payload's framed bytes: from Redis, else from the database (and cached again)."""
    import redis

    try:
        data = r.get(key)
    except redis.RedisError:
        data = None  # the database has it: a Redis outage need not fail the job
    if data is not None:
        return bytes(data)  # type: ignore[arg-type]
    with Session(engine) as session:
        row = session.get(Payload, key)
    if row is None:
        raise PayloadError(f"payload {key} is gone: neither Redis nor the database holds it "
                           "(its launch ended, or it was never accepted)")
    with contextlib.suppress(redis.RedisError):
        r.set(key, row.data, ex=cache_ttl_s)
    return bytes(row.data)


def load(r: redis.Redis, engine: Engine, key: str, *, cache_ttl_s: int,
         secret: str | None, limit_bytes: int | None) -> Any:
    """A stored payload's value, checked (and authenticated, for this key) before it is
    unpickled: bytes copied here from another payload's key are refused."""
    return payloads.unpack(fetch(r, engine, key, cache_ttl_s), secret, limit_bytes, key=key)


def drop(session: Session, r: redis.Redis, key: str) -> None:
    """Delete a payload from the database (in the caller's transaction) and from Redis."""
    session.execute(delete(Payload).where(Payload.key == key))  # type: ignore[arg-type]
    r.delete(key)
