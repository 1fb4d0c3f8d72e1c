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


ExpiresOpt = typer.Option(None, "--expires", metavar="SPAN",
                          help="The token stops working after this span: 90d, 12h.")


@users.command()
def add(name: str = typer.Argument(..., help="The user's name, as their jobs' owner."),
        admin: bool = typer.Option(False, "--admin",
                                   help="May see and cancel every user's jobs."),
        os_user: str | None = typer.Option(
            None, "--os-user", metavar="NAME",
            help="The OS account their jobs run as (a stack run by root; default: the "
                 "account of their name)."),
        same_account: bool = typer.Option(
            False, "--same-account",
            help="Their jobs run as the stack's own account, which can read its secrets."),
        expires: str | None = ExpiresOpt) -> None:
    """Add a user (or a revoked one again) and print their token, once: only its hash is
    kept."""
    from app.core.accounts import SAME_ACCOUNT_WARNING
    from app.core.identity import stack_owner
    from app.store import users as store

    expires_s = None if expires is None else store.expiry_seconds(expires)
    with _engine() as engine:
        token = store.add(engine, name, admin, os_user=os_user, same_account=same_account,
                          expires_s=expires_s)
        account = next(u.os_user for u in store.list_users(engine) if u.name == name)
    typer.echo(token)
    if same_account:
        typer.echo("warning: " + SAME_ACCOUNT_WARNING.format(name=name,
                                                             stack=stack_owner().name),
                   err=True)
    runs = f"; their jobs run as {account}" if account else ""
    typer.echo(f"added {name}{' (admin)' if admin else ''}{runs}; the token above is shown "
               "only now: give it to them, to put in GPUQ_TOKEN or a 0600 file "
               "(GPUQ_TOKEN_FILE, ~/.config/gpuq/token)", err=True)


@users.command()
def token(name: str = typer.Argument(..., help="The user whose token is replaced."),
          rotate: bool = typer.Option(False, "--rotate",
                                      help="Issue a new token; the old one stops working."),
          expires: str | None = ExpiresOpt) -> None:
    """Replace a user's token (`--rotate`) and print the new one, once; their jobs stay."""
    from app.core.errors import InvalidArguments
    from app.store import users as store

    if not rotate:
        raise InvalidArguments("a token is kept only as its hash and cannot be shown again: "
                               f"`gpuq user token {name} --rotate` issues a new one")
    expires_s = None if expires is None else store.expiry_seconds(expires)
    with _engine() as engine:
        new = store.rotate(engine, name, expires_s)
    typer.echo(new)
    typer.echo(f"rotated {name}'s token: the old one stops working now, the one above is "
               "shown only now", err=True)


@users.command("list")
def list_users(as_json: bool = JsonOpt) -> None:
    """Every user: admin or not, the OS account their jobs run as, when added, when their
    token expires and was last used, and revoked ones."""
    from app.core.text import printable
    from app.store import users as store

    with _engine() as engine:
        found = store.list_users(engine)
    rows = [{"name": u.name, "admin": u.admin, "runs_as": _runs_as(u.os_user, u.same_account),
             "os_user": u.os_user, "same_account": u.same_account,
             "created_at": _iso(u.created_at), "expires_at": _iso(u.expires_at),
             "last_used_at": _iso(u.last_used_at), "revoked_at": _iso(u.revoked_at)}
            for u in found]
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("no users: `gpuq user add NAME` adds one")
    for row in rows:
        flags = " admin" if row["admin"] else ""
        parts = [f"jobs as {printable(str(row['runs_as']))}", f"added {row['created_at']}",
                 f"expires {row['expires_at'] or 'never'}",
                 f"last used {row['last_used_at'] or 'never'}"]
        if row["revoked_at"]:
            parts.append(f"revoked {row['revoked_at']}")
        typer.echo(f"{printable(str(row['name']))}{flags}: {', '.join(parts)}")


def _runs_as(os_user: str | None, same_account: bool) -> str:
    """Whose account a user's jobs run as, in words."""
    if os_user:
        return os_user
    return "same account" if same_account else "same account (added before accounts)"


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
