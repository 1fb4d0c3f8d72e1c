"""The database's schema revision (Alembic): a fresh database is brought to the head, one
behind or ahead of this gpuq is refused, and `gpuq db upgrade` moves one forward."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, create_engine, inspect, text
from sqlmodel import SQLModel

from app.core.errors import SchemaOutdated, SchemaTooNew
from app.store.migrations import HEAD_REVISION

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")
# The revision whose schema the gpuq of before migrations made, with no alembic_version.
BASELINE_REVISION = "0001"
# pg_advisory_xact_lock's key for "gpuq is migrating this database" (any fixed bigint).
PG_LOCK_KEY = 0x67707571  # "gpuq"
UPGRADE_HINT = "run `gpuq db upgrade`"


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands against this gpuq's migrations."""

    revision: str | None  # the database's, None where it has no alembic_version
    head: str  # this gpuq's newest revision
    has_tables: bool  # any of gpuq's tables

    @property
    def is_current(self) -> bool:
        return self.revision == self.head

    @property
    def is_empty(self) -> bool:
        return self.revision is None and not self.has_tables

    def describe(self) -> str:
        """The database's revision as `gpuq db current` shows it."""
        if self.revision is not None:
            return self.revision
        return "none (an empty database)" if self.is_empty else "none (made before migrations)"


def check(engine: Engine, where: str) -> None:
    """Bring an empty database to the head; refuse, naming the fix, one behind or ahead."""
    with engine.connect() as conn:
        if _revision(conn) == HEAD_REVISION:  # the common case: no Alembic to load
            return
    with _migration_lock(engine) as conn:
        # Decided under the lock: a process that waited finds the database migrated.
        state = _state(conn)
        if state.is_empty:
            _alembic(conn, "upgrade", "head")
            return
    if not state.is_current:
        raise refusal(state, where)


def refusal(state: SchemaState, where: str) -> SchemaOutdated | SchemaTooNew:
    """The one-line error for a database this gpuq cannot use as it is."""
    if state.revision is not None and not _known(state.revision):
        return SchemaTooNew(
            f"the database at {where} is at schema revision {state.revision}, which this gpuq "
            f"(head {state.head}) does not know: this gpuq is older than the database; "
            "upgrade gpuq on this host")
    if state.revision is None:
        return SchemaOutdated(f"the database at {where} was made by an older gpuq (no schema "
                              f"revision; this gpuq's is {state.head}); {UPGRADE_HINT}")
    return SchemaOutdated(f"the database at {where} is at schema revision {state.revision}, "
                          f"behind this gpuq's {state.head}; {UPGRADE_HINT}")


def current(engine: Engine) -> SchemaState:
    """Where the database stands, without changing it."""
    with engine.connect() as conn:
        return _state(conn)


def upgrade(engine: Engine, where: str) -> tuple[SchemaState, SchemaState]:
    """Upgrade the database to the head; a database made before migrations is stamped at
    the baseline first. Returns the states before and after."""
    with _migration_lock(engine) as conn:
        before = _state(conn)
        if before.revision is not None and not _known(before.revision):
            raise refusal(before, where)
        if before.revision is None and before.has_tables:
            _check_baseline(conn, where)
            _alembic(conn, "stamp", BASELINE_REVISION)
        _alembic(conn, "upgrade", "head")
        return before, _state(conn)


def _revision(conn: Connection) -> str | None:
    if not inspect(conn).has_table("alembic_version"):
        return None
    versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return ",".join(sorted(versions)) or None


def _state(conn: Connection) -> SchemaState:
    have = set(inspect(conn).get_table_names())
    return SchemaState(_revision(conn), HEAD_REVISION,
                       any(name in have for name in SQLModel.metadata.tables))


def _known(revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return all(ScriptDirectory.from_config(_config()).get_revision(r) is not None
                   for r in revision.split(","))
    except CommandError:  # "no such revision": a newer gpuq's
        return False


def _config(conn: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def _alembic(conn: Connection, name: str, revision: str) -> None:
    from alembic import command

    getattr(command, name)(_config(conn), revision)


def _check_baseline(conn: Connection, where: str) -> None:
    """Refuse to stamp a database older than the baseline: it lacks the baseline's columns,
    and the revisions after it would fail on them."""
    scratch = create_engine("sqlite://")
    with scratch.begin() as baseline:
        _alembic(baseline, "upgrade", BASELINE_REVISION)
        wanted = _columns(baseline)
    scratch.dispose()
    have = _columns(conn)
    missing = sorted(wanted - have)
    if missing:
        raise SchemaOutdated(
            f"the database at {where} was made by a gpuq older than its schema migrations and "
            f"lacks {', '.join(missing)}; finish or export its jobs, then move it aside "
            "(SQLite: GPUQ_HOME/gpuq.db) or point GPUQ_DATABASE_URL at a new database")


def _columns(conn: Connection) -> set[str]:
    inspector = inspect(conn)
    return {f"{table}.{column['name']}" for table in inspector.get_table_names()
            if table != "alembic_version" for column in inspector.get_columns(table)}


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A transaction that no other gpuq process migrating this database runs beside: several
    processes opening a fresh database at once create its tables once."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
            yield conn
        return
    database = engine.url.database
    on_file = database and database != ":memory:"
    with (_file_lock(Path(f"{database}.migrate.lock")) if on_file else nullcontext()), \
            engine.begin() as conn:
        yield conn


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
