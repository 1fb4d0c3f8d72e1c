"""`gpuq project`: which named users may submit to which project."""

from __future__ import annotations

import typer

from app.cli.common import JsonOpt, client, print_json

project_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="Projects and their members: who may submit to which.")


def _names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def _echo(out: dict[str, object]) -> None:
    members = out["members"]
    assert isinstance(members, list)
    typer.echo(f"project {out['name']}: {', '.join(members) or 'no members (gone)'}")


@project_app.command()
def add(name: str = typer.Argument(..., help="The project's name."),
        member: str = typer.Option(..., "--member", metavar="A,B",
                                   help="Its first members, comma-separated.")) -> None:
    """Make a project and name the users who may submit to it (an admin's)."""
    _echo(client().call("add_project", name=name, members=_names(member)))


@project_app.command()
def members(name: str = typer.Argument(..., help="The project's name."),
            add: str | None = typer.Option(None, "--add", metavar="A,B",
                                           help="Users to make members."),
            remove: str | None = typer.Option(None, "--remove", metavar="A,B",
                                              help="Members to remove.")) -> None:
    """Add or remove a project's members (an admin's); with neither, list them."""
    _echo(client().call("project_members", name=name, add=_names(add),
                        remove=_names(remove)))


@project_app.command("list")
def list_(as_json: bool = JsonOpt) -> None:
    """Every project that has members, with them."""
    out = client().call("list_projects")
    if as_json:
        print_json(out)
        return
    if out["open_projects"]:
        typer.echo("projects open to everyone (GPUQ_OPEN_PROJECTS)")
    for project in out["projects"]:
        _echo(project)
    if not out["projects"] and not out["open_projects"]:
        typer.echo("no projects have members: each user submits to their default project")
