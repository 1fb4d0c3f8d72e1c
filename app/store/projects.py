"""Projects' members: the named users an admin let submit to a project (`gpuq project`).

A project exists while it has a member; its limits and weight are in app/store/limits.py.
Without GPUQ_OPEN_PROJECTS a named user names only their default project or one they are a
member of (app/ops/submit.py); the stack's owner and admins name any.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from app.core.errors import InvalidArguments
from app.core.text import plain_name_problem
from app.store.limits import check_project
from app.store.models import ProjectMember

MEMBERS = ProjectMember.__table__  # type: ignore[attr-defined]


def check_members(members: Iterable[str]) -> list[str]:
    """The names, each once and in order; a name that is not short and plain is refused."""
    names = list(dict.fromkeys(members))
    for name in names:
        if (problem := plain_name_problem("user name", name)) is not None:
            raise InvalidArguments(problem)
    return names


def members_of(conn: Connection | Session, project: str) -> list[str]:
    return list(conn.execute(select(MEMBERS.c.member).where(MEMBERS.c.name == project)
                             .order_by(MEMBERS.c.member)).scalars())


def is_member(conn: Connection | Session, project: str, user: str) -> bool:
    return conn.execute(select(MEMBERS.c.member).where(
        MEMBERS.c.name == project, MEMBERS.c.member == user)).first() is not None


def every_project(conn: Connection | Session) -> dict[str, list[str]]:
    """Every project that has members, with them, by name."""
    found: dict[str, list[str]] = {}
    for name, member in conn.execute(select(MEMBERS.c.name, MEMBERS.c.member)
                                     .order_by(MEMBERS.c.name, MEMBERS.c.member)):
        found.setdefault(name, []).append(member)
    return found


def add_members(conn: Connection, project: str, members: Iterable[str]) -> None:
    """Make them members (one already a member stays one)."""
    check_project(project)
    names = check_members(members)
    if not names:
        return
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(MEMBERS)
    conn.execute(insert.values([{"name": project, "member": m} for m in names])
                 .on_conflict_do_nothing(index_elements=["name", "member"]))


def remove_members(conn: Connection, project: str, members: Iterable[str]) -> None:
    names = check_members(members)
    if names:
        conn.execute(delete(MEMBERS).where(MEMBERS.c.name == project,
                                           MEMBERS.c.member.in_(names)))
