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


@db.command()
def prune(older_than_days: float = typer.Option(
        None, "--older-than-days", min=0,
        help="Delete jobs that ended this many days ago or more (default: "
             "GPUQ_KEEP_FINISHED_DAYS).")) -> None:
    """Delete finished jobs past their retention now, with their events, launches and
    payloads; their log files go at each host's next sweep."""
    from app.cli.common import load_settings
    from app.runtime import Runtime
    from scheduler.dispatch.reconcile import prune_finished_jobs

    settings = load_settings()
    days = settings.keep_finished_days if older_than_days is None else older_than_days
    if older_than_days is None and days <= 0:
        typer.echo("GPUQ_KEEP_FINISHED_DAYS is 0: finished jobs are kept for ever; "
                   "pass --older-than-days to prune anyway")
        return
    rt = Runtime(settings)
    try:
        pruned = prune_finished_jobs(rt, days)
    finally:
        rt.close()
    typer.echo(f"pruned {pruned} jobs that ended over {days:g} days ago")


@db.command()
def recount() -> None:
    """Count the jobs per launch and state again, replacing the kept counts that `gpuq
    status`, `gpuq launches` and waits read (after the jobs table was edited by hand)."""
    from app.cli.common import load_settings
    from app.runtime import Runtime
    from app.store.counts import recount as count_again

    rt = Runtime(load_settings())
    try:
        with rt.session() as session:
            found = count_again(session)
    finally:
        rt.close()
    typer.echo(f"counted {found['jobs']} jobs in {found['rows']} launch and state pairs")
