"""`gpuq db`: the database's schema revision, shown and upgraded."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from sqlalchemy import Engine

db = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                 help="The database's schema: its revision, upgrades.")


def _engine() -> tuple[Engine, str]:
    """The database, opened without the refusal of a schema behind or ahead of this gpuq."""
    from app.cli.common import load_settings
    from app.core.settings import mask_url
    from app.store.db import make_engine

    settings = load_settings()
    return (make_engine(settings, check_revision=False),
            mask_url(settings.effective_database_url()))


@db.command()
def current() -> None:
    """Print the database's schema revision and this gpuq's, and whether they agree."""
    from app.store import schema

    engine, where = _engine()
    try:
        state = schema.current(engine)
    finally:
        engine.dispose()
    typer.echo(f"database: {where}")
    typer.echo(f"revision: {state.describe()}")
    typer.echo(f"head:     {state.head}")
    if state.is_current:
        typer.echo("up to date")
    elif state.is_empty:
        typer.echo("empty: gpuq creates its tables when it first opens it")
    else:
        typer.echo(f"not up to date: {schema.refusal(state, where)}")


@db.command()
def upgrade() -> None:
    """Upgrade the database's schema to this gpuq's (a database made before migrations too)."""
    from app.store import schema

    engine, where = _engine()
    try:
        before, after = schema.upgrade(engine, where)
    finally:
        engine.dispose()
    if before.revision == after.revision:
        typer.echo(f"{where}: already at {after.revision}")
    else:
        typer.echo(f"{where}: upgraded from {before.describe()} to {after.revision}")
