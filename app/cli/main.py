"""`gpuq`, the command line: the app of app/cli/common.py with every command registered."""

from __future__ import annotations

import sys

import typer

from app.cli import jobs, servers  # noqa: F401  (register their commands)
from app.cli.common import State, cli
from app.cli.db import db
from app.core.errors import GpuqError

cli.add_typer(db, name="db")

__all__ = ["cli", "main"]


def main() -> None:
    try:
        cli()
    except GpuqError as e:
        if State.verbose:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)

