"""The system of record: engine creation for SQLite (WAL) or PostgreSQL."""

from __future__ import annotations

import logging
import math
import sqlite3
from typing import Any

from sqlalchemy import Connection, Engine, event, make_url, text
from sqlalchemy.exc import OperationalError
from sqlmodel import create_engine
from tenacity import (
    RetryCallState,
    before_sleep_log,
    retry,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from app.core.errors import DatabaseUnavailable
from app.core.paths import private_home
from app.core.settings import Settings, mask_url
from app.store import models, schema  # noqa: F401  (models: the tables on SQLModel.metadata)

log = logging.getLogger(__name__)

def _past_the_budget(state: RetryCallState) -> bool:
    """Stop once the call's Settings.database_retry_s has passed (its first argument is a
    Runtime, or anything with `settings`)."""
    owner = state.args[0] if state.args else None
    settings = getattr(owner, "settings", None)
    budget = settings.database_retry_s if isinstance(settings, Settings) else 120.0
    return stop_after_delay(budget)(state)


# A worker's writes wait out a database that is away for a while (a restart, a failover)
# instead of failing the job whose outcome they record.
riding_out_outages = retry(
    retry=retry_if_exception_type(OperationalError),
    wait=wait_exponential(multiplier=0.1, max=2),
    stop=_past_the_budget,
    before_sleep=before_sleep_log(log, logging.WARNING),
    reraise=True,
)


def begin_writing(conn: Connection) -> None:
    """On SQLite, take the database's write lock now (BEGIN IMMEDIATE) rather than at the
    transaction's first write, so that what this transaction reads stays true until it
    ends; other databases lock finer, and their callers say what."""
    if conn.dialect.name == "sqlite" and not conn.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # busy_timeout turns lock contention between worker processes into a short wait instead
    # of an error; it is set first so that the statements below wait too.
    cursor.execute("PRAGMA busy_timeout=30000")
    # WAL lets readers (the CLI) run while workers write. The mode is stored in the file, so
    # it is set only where it is not set yet: asking for it again needs a lock that SQLite
    # does not wait for while another process opens or checkpoints the database.
    _while_locked(cursor, "PRAGMA journal_mode")
    if cursor.fetchone()[0].lower() != "wal":
        _while_locked(cursor, "PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
    # Fair share decays usage in SQL (app/store/accounting.py); SQLite builds without its
    # math functions lack power().
    dbapi_connection.create_function("power", 2, math.pow, deterministic=True)


def _locked(e: BaseException) -> bool:
    return isinstance(e, sqlite3.OperationalError) and "locked" in str(e)


# SQLite answers "database is locked" at once, without its busy handler, while another
# connection runs the WAL's recovery; the statements that open a connection wait it out.
@retry(retry=retry_if_exception(_locked), wait=wait_exponential(multiplier=0.005, max=0.25),
       stop=stop_after_delay(30), reraise=True)
def _while_locked(cursor: Any, statement: str) -> None:
    cursor.execute(statement)


def server_connect_args(settings: Settings, url: str, limit_statements: bool = True
                        ) -> dict[str, Any]:
    """A PostgreSQL connection's timeouts (psycopg's connect arguments): opening it gives up
    after GPUQ_DB_CONNECT_TIMEOUT_S and each statement after GPUQ_DB_STATEMENT_TIMEOUT_S, so
    that a server cut off by the network fails a call, which its caller retries or reports,
    instead of hanging it. What the URL sets itself wins; its own `options` are kept.
    `limit_statements=False`: no statement timeout (migrations may run long)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return {}
    query = parsed.query
    args: dict[str, Any] = {}
    if "connect_timeout" not in query:
        args["connect_timeout"] = settings.db_connect_timeout_s
    if limit_statements and settings.db_statement_timeout_s > 0:
        own = query.get("options")
        limit = f"-c statement_timeout={round(settings.db_statement_timeout_s * 1000)}"
        args["options"] = f"{own} {limit}" if isinstance(own, str) and own else limit
    return args


def make_engine(settings: Settings, check_revision: bool = True) -> Engine:
    """Create the engine; bring an empty database to the schema's head and refuse one behind
    or ahead of this gpuq (`check_revision=False`: `gpuq db`, which shows and upgrades it).
    Raise DatabaseUnavailable, or SchemaOutdated/SchemaTooNew, naming the fix."""
    url = settings.effective_database_url()
    if url.startswith("sqlite"):
        private_home(settings.home)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5,
                               connect_args=server_connect_args(settings, url, check_revision))
    # Fair share's half-life, which usage is decayed with as it is written (accounting.py).
    engine.update_execution_options(
        gpuq_half_life_s=settings.fair_share_half_life_days * 86400)
    try:
        if check_revision:
            schema.check(engine, mask_url(url))
        else:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
    except OperationalError as e:
        engine.dispose()
        raise DatabaseUnavailable(
            f"cannot reach the database at {mask_url(url)}: {e.orig}; "
            "check GPUQ_DATABASE_URL or unset it to use SQLite under GPUQ_HOME"
        ) from e
    except BaseException:
        engine.dispose()
        raise
    return engine
