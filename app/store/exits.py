"""Exits of supervised programs, kept in Redis so that `gpuq status` names a crash loop.

The supervisors (`gpuq up`, `gpuq worker`) restart what dies, with backoff; without a
record a program that dies every few seconds would look merely slow to come up.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from app.core import keys

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

WINDOW_S = 300.0  # exits counted for the crash-loop verdict happened this recently
CRASH_LOOP_EXITS = 3  # this many exits within WINDOW_S is a crash loop
KEEP_S = 3600  # a program's record outlives its last exit by this long


class RestartLog:
    """Writes one supervisor's exits under its host's name, from a thread of its own: the
    supervisor never waits on Redis, and an exit that Redis could not take (Redis itself
    may be the program that died) is written, with the time it happened, once Redis answers
    again. Never raises."""

    RETRY_S = 1.0
    MAX_PENDING = 100  # exits kept while Redis is away; older ones are dropped first

    def __init__(self, connect: Callable[[], redis.Redis], host: str) -> None:
        self._connect = connect  # called on first use: the broker may start after us
        self._redis: redis.Redis | None = None
        self.host = host
        self._pending: list[tuple[str, int, float, float]] = []
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None

    def __call__(self, program: str, exit_code: int, backoff_s: float) -> None:
        with self._lock:
            self._pending = [*self._pending, (program, exit_code, backoff_s, time.time())][
                -self.MAX_PENDING:]
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_pending, daemon=True,
                                                name="gpuq-exits")
                self._writer.start()

    def _write_pending(self) -> None:
        import redis as redis_lib

        from app.core.errors import GpuqError

        warned = False
        while True:
            with self._lock:
                if not self._pending:
                    self._writer = None
                    return
                entry = self._pending[0]
            program, exit_code, backoff_s, at = entry
            try:
                if self._redis is None:
                    self._redis = self._connect()
                record_exit(self._redis, self.host, program, exit_code, backoff_s, now=at)
            except (redis_lib.RedisError, OSError, GpuqError) as e:
                if not warned:
                    log.warning("the exit of %s is not recorded yet (%s); it will be once "
                                "Redis answers", program, e)
                    warned = True
                time.sleep(self.RETRY_S)
                continue
            with self._lock:
                if self._pending and self._pending[0] is entry:
                    self._pending.pop(0)


def record_exit(r: redis.Redis, host: str, program: str, exit_code: int, backoff_s: float,
                now: float | None = None) -> None:
    """Count one exit of `program` on `host` and remember when it happened."""
    now = time.time() if now is None else now
    key = keys.restarts(host, program)
    # One writer per key (the program's own supervisor): read, trim, write is safe.
    previous = r.hget(key, "recent")
    recent = [t for t in json.loads(previous or b"[]") if t > now - WINDOW_S]  # type: ignore[arg-type]
    pipe = r.pipeline()
    pipe.hincrby(key, "exits", 1)
    pipe.hset(key, mapping={"host": host, "program": program, "exit_code": exit_code,
                            "at": now, "backoff_s": backoff_s,
                            "recent": json.dumps([*recent, now])})
    pipe.expire(key, KEEP_S)
    pipe.zadd(keys.RESTARTS, {f"{host}/{program}": now})
    pipe.execute()


def recent_exits(r: redis.Redis, now: float | None = None) -> list[dict[str, Any]]:
    """Programs that exited within KEEP_S, each with `crash_loop` set when it exited
    CRASH_LOOP_EXITS times or more within the last WINDOW_S."""
    now = time.time() if now is None else now
    r.zremrangebyscore(keys.RESTARTS, "-inf", now - KEEP_S)
    out = []
    for name in r.zrange(keys.RESTARTS, 0, -1):
        host, _, program = name.decode().partition("/")  # type: ignore[union-attr]
        raw: dict[bytes, bytes] = r.hgetall(keys.restarts(host, program))  # type: ignore[assignment]
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        if not fields:
            continue
        in_window = sum(1 for t in json.loads(fields["recent"]) if t > now - WINDOW_S)
        out.append({"host": host, "program": program, "exits": int(fields["exits"]),
                    "exits_in_window": in_window, "window_s": WINDOW_S,
                    "exit_code": int(fields["exit_code"]), "last_exit_at": float(fields["at"]),
                    "backoff_s": float(fields["backoff_s"]),
                    "crash_loop": in_window >= CRASH_LOOP_EXITS})
    return out
