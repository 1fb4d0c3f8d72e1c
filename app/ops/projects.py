"""Operations on projects' members (`gpuq project`): who may submit to a project."""

from __future__ import annotations

from typing import Any

from app.core.errors import InvalidArguments, NotPermitted
from app.core.identity import Actor
from app.ops.registry import operation
from app.runtime import Runtime
from app.store import projects


def _admin_only(actor: Actor | None, what: str) -> None:
    if actor is not None and not actor.admin:
        raise NotPermitted(f"projects' members are an admin's to {what}; ask one (gpuq "
                           "project list shows them)")


@operation
def add_project(rt: Runtime, name: str, members: list[str],
                actor: Actor | None = None) -> dict[str, Any]:
    """Make a project with its first members (`gpuq project add NAME --member A,B`)."""
    _admin_only(actor, "add")
    if not members:
        raise InvalidArguments(f"a project exists while it has members: name them (gpuq "
                               f"project add {name} --member alice,bob)")
    with rt.engine.begin() as conn:
        if projects.members_of(conn, name):
            raise InvalidArguments(f"project {name} exists; change its members with gpuq "
                                   f"project members {name} --add USER")
        projects.add_members(conn, name, members)
        return {"name": name, "members": projects.members_of(conn, name)}


@operation
def project_members(rt: Runtime, name: str, add: list[str] | None = None,
                    remove: list[str] | None = None,
                    actor: Actor | None = None) -> dict[str, Any]:
    """Add and remove a project's members (`gpuq project members NAME --add C --remove B`);
    with neither, its members. A project whose last member goes is gone."""
    if add or remove:
        _admin_only(actor, "change")
    with rt.engine.begin() as conn:
        projects.add_members(conn, name, add or [])
        projects.remove_members(conn, name, remove or [])
        return {"name": name, "members": projects.members_of(conn, name)}


@operation
def list_projects(rt: Runtime) -> dict[str, Any]:
    """Every project that has members, with them (`gpuq project list`), and whether
    GPUQ_OPEN_PROJECTS lets every user name any project."""
    with rt.engine.connect() as conn:
        found = projects.every_project(conn)
    return {"projects": [{"name": n, "members": m} for n, m in found.items()],
            "open_projects": rt.settings.open_projects}
