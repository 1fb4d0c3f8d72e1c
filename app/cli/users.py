"""`gpuq user`: the named users who reach gpuq with a token (the stack's owner needs none)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import typer

from app.cli.common import JsonOpt, print_json

if TYPE_CHECKING:
    from sqlalchemy import Engine

users = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                    help="Named users and their tokens (the stack's owner needs none).")


@contextmanager
def _engine() -> Iterator[Engine]:
    from app.cli.common import load_settings
    from app.store.db import make_engine

    engine = make_engine(load_settings())
    try:
        yield engine
    finally:
        engine.dispose()


@users.command()
def add(name: str = typer.Argument(..., help="The user's name, as their jobs' owner."),
        admin: bool = typer.Option(False, "--admin",
                                   help="May see and cancel every user's jobs.")) -> None:
    """Add a user and print their token, once: only its hash is kept."""
    from app.store import users as store

    with _engine() as engine:
        token = store.add(engine, name, admin)
    typer.echo(token)
    typer.echo(f"added {name}{' (admin)' if admin else ''}; the token above is shown only "
               "now: give it to them, to put in GPUQ_TOKEN or a 0600 file (GPUQ_TOKEN_FILE, "
               "~/.config/gpuq/token)", err=True)


@users.command("list")
def list_users(as_json: bool = JsonOpt) -> None:
    """Every user: admin or not, when added, and revoked ones."""
    from app.core.text import printable
    from app.store import users as store

    with _engine() as engine:
        found = store.list_users(engine)
    rows = [{"name": u.name, "admin": u.admin, "created_at": _iso(u.created_at),
             "revoked_at": _iso(u.revoked_at)} for u in found]
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no users: `gpuq user add NAME` adds one")
    for row in rows:
        flags = " admin" if row["admin"] else ""
        revoked = f" revoked {row['revoked_at']}" if row["revoked_at"] else ""
        typer.echo(f"{printable(str(row['name']))}{flags} added {row['created_at']}{revoked}")


@users.command()
def revoke(name: str = typer.Argument(..., help="The user whose token stops working.")) -> None:
    """Revoke a user's token at once; their jobs stay theirs."""
    from app.store import users as store

    with _engine() as engine:
        store.revoke(engine, name)
    typer.echo(f"revoked {name}")


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")
