"""Named gpuq users: everyone who reaches gpuq other than the stack's owner shows a token.

A token is printed once, when its user is added or it is rotated; the database keeps only
its SHA-256, so that whoever reads the database learns no token. A token is found by its
hash (one indexed lookup, no comparison over secret bytes in Python); a revoked user's
token, a replaced one and an expired one find no one.

Each user's jobs run as an OS account (app/core/accounts.py): `run_as` names it for the
worker at the moment a job starts.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from typing import Any

from sqlalchemy import Connection, Engine, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.accounts import RunAs, choose_account, os_account
from app.core.errors import InvalidArguments, NoRunAccount, UserExists, UserNotFound
from app.core.identity import Actor, stack_owner
from app.core.text import plain_name_problem
from app.store.models import User

TOKEN_PREFIX = "gpuq_"
USERS = User.__table__  # type: ignore[attr-defined]
# A busy client shows its token on every request: record its use once a minute at most.
LAST_USED_EVERY_S = 60.0
EXPIRY = re.compile(r"([1-9][0-9]{0,5})([dh])")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode(errors="surrogateescape")).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh token and its hash."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, token_hash(token)


def check_name(name: str) -> str:
    """Refuse a name that is not a short plain login-like name, naming the rule."""
    if (problem := plain_name_problem("user name", name)) is not None:
        raise InvalidArguments(problem)
    return name


def expiry_seconds(span: str) -> float:
    """`90d` or `12h` as seconds; anything else is refused naming the form."""
    found = EXPIRY.fullmatch(span.strip().lower())
    if found is None:
        raise InvalidArguments(f"--expires takes a number of days or hours such as 90d or "
                               f"12h, got {span!r}")
    return int(found[1]) * (86400 if found[2] == "d" else 3600)


def add(engine: Engine, name: str, admin: bool = False, *, os_user: str | None = None,
        same_account: bool = False, expires_s: float | None = None) -> str:
    """Add a user; return their token (kept nowhere but in the caller's hands).

    Their jobs run as `os_user`, else the OS account of their name (a stack run by root
    only), or as the stack's own account with `same_account` (app/core/accounts.py).
    A revoked user's name may be added again: the row is reused with a fresh token, the
    new options, and revoked_at cleared; their jobs stay theirs."""
    check_name(name)
    if name == stack_owner().name:
        raise InvalidArguments(f"{name!r} is the stack's owner, who acts without a token; "
                               "give the user another name")
    account = choose_account(name, os_user, same_account, as_root=os.geteuid() == 0)
    token, hashed = new_token()
    now = time.time()
    values = {"token_hash": hashed, "admin": admin, "created_at": now, "revoked_at": None,
              "os_user": account, "same_account": same_account, "last_used_at": None,
              "expires_at": None if expires_s is None else now + expires_s}
    exists = UserExists(f"a user named {name!r} exists already; `gpuq user list` shows them "
                        f"(`gpuq user token {name} --rotate` issues them a new token)")
    try:
        with engine.begin() as conn:
            reused = conn.execute(update(USERS).where(USERS.c.name == name)
                                  .where(USERS.c.revoked_at.is_not(None)).values(**values)
                                  .returning(USERS.c.name)).first()
            if reused is None:
                conn.execute(insert(USERS).values(name=name, **values))
    except IntegrityError:
        raise exists from None
    return token


def rotate(engine: Engine, name: str, expires_s: float | None = None) -> str:
    """Give a user a new token, returned once; their old one names no one from now on.
    The new token expires after `expires_s` (None: never), whatever the old one's expiry.
    Their jobs, account and rights are untouched."""
    token, hashed = new_token()
    now = time.time()
    with engine.begin() as conn:
        found = conn.execute(update(USERS).where(USERS.c.name == name)
                             .where(USERS.c.revoked_at.is_(None))
                             .values(token_hash=hashed, last_used_at=None,
                                     expires_at=None if expires_s is None else now + expires_s)
                             .returning(USERS.c.name)).first()
        if found is None:
            _refuse_unknown(conn, name, fix=f"`gpuq user add {name}` issues a revoked user a "
                                            "new token")
    return token


def list_users(engine: Engine) -> list[User]:
    """Every user, revoked ones included, by name."""
    with engine.connect() as conn:
        rows = conn.execute(select(USERS).order_by(USERS.c.name)).mappings().all()
    return [User.model_validate(dict(row)) for row in rows]


def revoke(engine: Engine, name: str) -> None:
    """Revoke a user's token at once: it is refused from the next request on."""
    with engine.begin() as conn:
        found = conn.execute(update(USERS).where(USERS.c.name == name)
                             .where(USERS.c.revoked_at.is_(None))
                             .values(revoked_at=time.time()).returning(USERS.c.name)).first()
        if found is None:
            _refuse_unknown(conn, name)


def _refuse_unknown(conn: Connection, name: str, fix: str | None = None) -> None:
    """Raise UserNotFound for a name with no row; with `fix`, for a revoked one too."""
    if conn.execute(select(USERS.c.name).where(USERS.c.name == name)).first() is None:
        raise UserNotFound(f"no user named {name!r}; `gpuq user list` shows them")
    if fix is not None:
        raise InvalidArguments(f"{name!r} is revoked: {fix}")


def actor_for_token(engine: Engine, token: str) -> Actor | None:
    """The user a token belongs to, or None (unknown, malformed, replaced, revoked or
    expired). Records the use, once a minute at most per user."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    now = time.time()
    with engine.connect() as conn:
        row = conn.execute(select(USERS.c.name, USERS.c.admin, USERS.c.last_used_at).where(
            USERS.c.token_hash == token_hash(token), USERS.c.revoked_at.is_(None),
            or_(USERS.c.expires_at.is_(None), USERS.c.expires_at > now))).first()
    if row is None:
        return None
    if row.last_used_at is None or row.last_used_at <= now - LAST_USED_EVERY_S:
        _record_use(engine, row.name, now)
    return Actor(row.name, admin=bool(row.admin))


def _record_use(engine: Engine, name: str, now: float) -> None:
    # Conditional, so that of many requests in the same minute one writes.
    with engine.begin() as conn:
        conn.execute(update(USERS).where(USERS.c.name == name).where(or_(
            USERS.c.last_used_at.is_(None), USERS.c.last_used_at <= now - LAST_USED_EVERY_S))
            .values(last_used_at=now))


def run_as(bind: Engine | Connection | Session, owner: str) -> RunAs | None:
    """The OS account to run a job of `owner` as, looked up with `pwd` now.

    None: run it as the stack's own account, for the stack's owner, a user added with
    `--same-account`, a user added before accounts (no os_user recorded), and an owner who
    is no user (named only by the stack's own code: every token names a row). Otherwise a
    RunAs (name, uid, gid, home, shell). Raises NoRunAccount, and the job must not run,
    for a revoked user, or an account that is gone or is root's. An
    expired token does not stop its user's jobs: expiry ends the token, not the account.
    `bind` is an engine, or the worker's connection or session (read within it)."""
    if owner == stack_owner().name:
        return None
    query = select(USERS.c.os_user, USERS.c.same_account, USERS.c.revoked_at).where(
        USERS.c.name == owner)
    row: Any
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            row = conn.execute(query).first()
    else:
        row = bind.execute(query).first()
    if row is None:
        # Only the stack's own code names an owner who is no user (a client acting for a
        # name, a message signed with GPUQ_SECRET): a token always names a user's row.
        return None
    if row.revoked_at is not None:
        raise NoRunAccount(f"the job's owner {owner!r} is revoked: `gpuq user add {owner}` "
                           "to let their jobs run again")
    if row.same_account or row.os_user is None:
        return None
    entry = os_account(row.os_user)
    if entry is None or entry.pw_uid == 0:
        gone = "is gone" if entry is None else "is root's"
        raise NoRunAccount(f"the OS account {row.os_user!r} of {owner!r} {gone}: `useradd "
                           f"{row.os_user}`, or revoke and add {owner} again with --os-user")
    return RunAs.of(entry)
