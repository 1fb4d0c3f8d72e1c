"""Named gpuq users: everyone who reaches gpuq other than the stack's owner shows a token.

A token is printed once, when its user is added; the database keeps only its SHA-256, so
that whoever reads the database learns no token. A token is found by its hash (one indexed
lookup, no comparison over secret bytes in Python), and a revoked user's token finds no one.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from app.core.errors import InvalidArguments, UserExists, UserNotFound
from app.core.identity import Actor, stack_owner
from app.core.text import plain_name_problem
from app.store.models import User

TOKEN_PREFIX = "gpuq_"
USERS = User.__table__  # type: ignore[attr-defined]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode(errors="surrogateescape")).hexdigest()


def check_name(name: str) -> str:
    """Refuse a name that is not a short plain login-like name, naming the rule."""
    if (problem := plain_name_problem("user name", name)) is not None:
        raise InvalidArguments(problem)
    return name


def add(engine: Engine, name: str, admin: bool = False) -> str:
    """Add a user; return their token (kept nowhere but in the caller's hands)."""
    check_name(name)
    if name == stack_owner().name:
        raise InvalidArguments(f"{name!r} is the stack's owner, who acts without a token; "
                               "give the user another name")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    try:
        with engine.begin() as conn:
            conn.execute(insert(USERS).values(name=name, token_hash=token_hash(token),
                                              admin=admin, created_at=time.time()))
    except IntegrityError:
        raise UserExists(f"a user named {name!r} exists already; `gpuq user list` shows "
                         "them (revoke it and add another name to issue a new token)") from None
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
        if found is None and conn.execute(
                select(USERS.c.name).where(USERS.c.name == name)).first() is None:
            raise UserNotFound(f"no user named {name!r}; `gpuq user list` shows them")


def actor_for_token(engine: Engine, token: str) -> Actor | None:
    """The user a token belongs to, or None (unknown, malformed, or revoked)."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    with engine.connect() as conn:
        row = conn.execute(select(USERS.c.name, USERS.c.admin).where(
            USERS.c.token_hash == token_hash(token), USERS.c.revoked_at.is_(None))).first()
    return None if row is None else Actor(row.name, admin=bool(row.admin))
