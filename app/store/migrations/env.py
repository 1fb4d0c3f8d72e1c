"""Alembic's environment for gpuq: run by `gpuq db upgrade`, by make_engine on a fresh
database, and by the `alembic` command line (alembic.ini at the project root)."""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from sqlalchemy import Connection
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

from app.store import models  # noqa: F401  (registers the tables on SQLModel.metadata)

config = context.config


def _render_item(kind: str, obj: Any, _context: Any) -> str | Literal[False]:
    """Write SQLModel's str columns as plain sa.String in a new revision, so that revisions
    import nothing of SQLModel."""
    if kind == "type" and isinstance(obj, AutoString):
        return "sa.String()" if obj.length is None else f"sa.String({obj.length})"
    return False


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=SQLModel.metadata,
        # SQLite alters a table by copying it; batch mode writes that copy for us.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        render_item=_render_item,
    )
    # gpuq passes a connection inside its own transaction (which holds the migration lock)
    # and commits it; the command line's connection gets a transaction of Alembic's own.
    with context.begin_transaction():
        context.run_migrations()


def _database_url() -> str:
    from app.core.settings import Settings

    return Settings().effective_database_url()


if context.is_offline_mode():
    context.configure(url=_database_url(), target_metadata=SQLModel.metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (given := config.attributes.get("connection")) is not None:
    _configure(given)
else:
    from sqlalchemy import create_engine

    engine = create_engine(_database_url())
    with engine.connect() as connection:
        _configure(connection)
    engine.dispose()
