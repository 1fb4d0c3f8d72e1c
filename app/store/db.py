"""The system of record: engine creation for SQLite (WAL) or PostgreSQL."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Engine, event, inspect, text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlmodel import SQLModel, create_engine
from tenacity import (
    before_sleep_log,
    retry,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from app.core.errors import DatabaseUnavailable, SchemaOutdated
from app.core.settings import Settings, mask_url
from app.store import models  # noqa: F401  (registers the tables on SQLModel.metadata)

log = logging.getLogger(__name__)

# A worker's writes wait out a database that is away for a while (a restart, a failover)
# instead of failing the job whose outcome they record.
riding_out_outages = retry(
    retry=retry_if_exception_type(OperationalError),
    wait=wait_exponential(multiplier=0.1, max=2),
    stop=stop_after_delay(120),
    before_sleep=before_sleep_log(log, logging.WARNING),
    reraise=True,
)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (the CLI) run while workers write; busy_timeout turns lock
    # contention between worker processes into a short wait instead of an error.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(settings: Settings) -> Engine:
    """Create the engine and the tables; raise DatabaseUnavailable naming the fix."""
    url = settings.effective_database_url()
    if url.startswith("sqlite"):
        settings.home.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    try:
        _create_tables(engine)
        _check_columns(engine, mask_url(url))
    except OperationalError as e:
        raise DatabaseUnavailable(
            f"cannot reach the database at {mask_url(url)}: {e.orig}; "
            "check GPUQ_DATABASE_URL or unset it to use SQLite under GPUQ_HOME"
        ) from e
    return engine


# Several processes may create the tables at once on a fresh PostgreSQL: the loser of that
# race sees a duplicate-object error and simply tries again.
@retry(
    retry=retry_if_exception_type((OperationalError, ProgrammingError, IntegrityError)),
    wait=wait_exponential(multiplier=0.1, max=1),
    stop=stop_after_delay(3),
    reraise=True,
)
def _create_tables(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("SELECT 1"))
    SQLModel.metadata.create_all(engine)


def _check_columns(engine: Engine, where: str) -> None:
    """Refuse, naming the fix, a database whose tables an older gpuq made: create_all adds
    missing tables but never missing columns, and every query would fail on them later."""
    inspector = inspect(engine)
    missing = [f"{table.name}.{column.name}" for table in SQLModel.metadata.sorted_tables
               for have in [{c["name"] for c in inspector.get_columns(table.name)}]
               for column in table.columns if column.name not in have]
    if missing:
        raise SchemaOutdated(
            f"the database at {where} was made by an older gpuq and lacks {', '.join(missing)}; "
            "finish or export its jobs, then move it aside (SQLite: GPUQ_HOME/gpuq.db) or point "
            "GPUQ_DATABASE_URL at a new database")
