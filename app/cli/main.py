"""`gpuq`, the command line: the app of app/cli/common.py with every command registered."""

from __future__ import annotations

import sys

import typer

from app.cli import jobs, report, servers, shares  # noqa: F401  (register their commands)
from app.cli.common import State, cli, state_fault
from app.cli.db import db
from app.cli.users import users
from app.core.errors import GpuqError

cli.add_typer(db, name="db")
cli.add_typer(users, name="user")
cli.add_typer(shares.limits_app, name="limits")

__all__ = ["cli", "main"]


def main() -> None:
    try:
        cli()
    except Exception as e:
        refusal = _refusal(e)
        if refusal is None or State.verbose:
            raise
        typer.echo(f"error: {refusal}", err=True)
        sys.exit(2)


def _refusal(error: Exception) -> GpuqError | None:
    """The one line to print for an error: gpuq's own, the state it keeps on disk (a home
    that cannot be written, a full disk, a damaged SQLite file), or a database that did not
    answer (sqlalchemy is looked up only when a command has loaded it)."""
    fault = state_fault(error)
    if fault is not None:
        return fault
    if isinstance(error, GpuqError):
        return error
    exc = sys.modules.get("sqlalchemy.exc")
    if exc is not None and isinstance(error, exc.OperationalError):
        from app.client.client import database_unavailable

        return database_unavailable(error)
    return None
