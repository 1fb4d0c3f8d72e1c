"""What the fault tests share: a stack's database reached through a proxy they can cut, the
database taken away, and waiting for jobs to end while servers come and go."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import make_url

from app.client import Client
from app.core.states import JobState
from tests.support.netutil import PausableProxy
from tests.support.servers import EXTERNAL_DB, _reset_database


@contextlib.contextmanager
def proxied_database() -> Iterator[tuple[PausableProxy | None, str | None]]:
    """(proxy, database URL) for a fault stack: on PostgreSQL (GPUQ_DATABASE_URL) an emptied
    database reached through a proxy that `database_away` cuts; on SQLite (None) no proxy."""
    if not EXTERNAL_DB:
        yield None, None
        return
    _reset_database(EXTERNAL_DB)
    parsed = make_url(EXTERNAL_DB)
    proxy = PausableProxy((parsed.host or "127.0.0.1", parsed.port or 5432))
    try:
        yield proxy, parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False)
    finally:
        proxy.down()


def database_away(home: Path, proxy: PausableProxy | None, seconds: float) -> None:
    """Take the database away for `seconds`. SQLite: another process holds its write lock
    (past its 30 s busy timeout when `seconds` is longer); PostgreSQL: every connection
    through the stack's proxy is cut and new ones refused."""
    if proxy is None:
        db = sqlite3.connect(home / "gpuq.db", isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)
        db.execute("ROLLBACK")
        db.close()
        return
    proxy.down()
    time.sleep(seconds)
    proxy.up()


def wait_ended(client: Client, ids: list[int], timeout_s: float) -> list[dict]:
    """Rows of `ids` once every one has ended; fail naming the states of the stragglers.
    A read that fails (the broker or the database still coming back) is tried again."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            rows = client.rows(ids)
        except Exception:
            rows = []
        if len(rows) == len(ids) and all(JobState(r["status"]).terminal for r in rows):
            return rows
        if time.monotonic() > deadline:
            left = Counter(r["status"] for r in rows if not JobState(r["status"]).terminal)
            raise AssertionError(f"not ended after {timeout_s}s: {dict(left)}")
        time.sleep(0.5)
