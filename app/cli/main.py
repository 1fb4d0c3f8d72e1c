"""`gpuq`, the command line: the app of app/cli/common.py with every command registered.

`gpuq NAME ...` imports only the module that defines NAME and runs an app holding that one
command, so that `gpuq queue` does not pay for the imports of `gpuq up` or `gpuq submit`'s
job options; `gpuq`, `gpuq --help` and a name gpuq does not know get the whole app. Either
way a command is the same function, with the same options and errors.
"""

from __future__ import annotations

import copy
import importlib
import sys
from typing import TYPE_CHECKING, Any

from app.core.errors import GpuqError

if TYPE_CHECKING:
    import typer
    from typer.models import CommandInfo

# The module that defines each command (importing it registers the command on `cli`).
COMMANDS: dict[str, str] = {
    **dict.fromkeys(["submit", "launch", "queue", "launches", "cancel", "update", "logs",
                     "wait", "status", "attach", "watch"], "app.cli.jobs"),
    **dict.fromkeys(["report", "job"], "app.cli.report"),
    **dict.fromkeys(["config", "up", "worker", "control-worker", "beat", "flower",
                     "dashboard"], "app.cli.servers"),
    "why": "app.cli.shares",
}
# Groups of subcommands: their name, and the module and Typer that hold them, in the order
# `gpuq --help` lists them.
GROUPS: dict[str, tuple[str, str]] = {
    "db": ("app.cli.db", "db"), "user": ("app.cli.users", "users"),
    "limits": ("app.cli.shares", "limits_app"), "project": ("app.cli.projects", "project_app"),
}
# The everyday commands: while the stack runs, its owner's go to its dashboard (app/cli/
# common.py client), which answers sooner than gpuq loads in process.
NEARBY = frozenset({"queue", "status", "submit", "launches", "job", "wait"})
# The options of `gpuq` itself that may stand before a command's name.
OWN_FLAGS = ("-v", "--verbose")

__all__ = ["app_for", "main", "whole_app"]  # and `cli`, the whole app (__getattr__)


def whole_app() -> typer.Typer:
    """The app with every command and group registered."""
    from app.cli.common import cli

    for module in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(module)
    registered = {group.name for group in cli.registered_groups}
    for name, (module, attribute) in GROUPS.items():
        if name not in registered:
            cli.add_typer(getattr(importlib.import_module(module), attribute), name=name)
    return cli


def app_for(argv: list[str]) -> typer.Typer:
    """The app that runs this command line: the one command it names, else the whole app."""
    name = next((arg for arg in argv if arg not in OWN_FLAGS), None)
    if name not in COMMANDS and name not in GROUPS:
        return whole_app()
    from app.cli.common import State, cli

    State.nearby = name in NEARBY
    one = copy.copy(cli)  # the same callback and settings, holding one command
    if name in GROUPS:
        module, attribute = GROUPS[name]
        one.registered_commands = []
        one.registered_groups = []
        one.add_typer(getattr(importlib.import_module(module), attribute), name=name)
        return one
    importlib.import_module(COMMANDS[name])
    one.registered_commands = [c for c in cli.registered_commands if _name(c) == name]
    one.registered_groups = []
    return one if one.registered_commands else whole_app()


def _name(command: CommandInfo) -> str | None:
    """A command's name as typer gives it: its own, else its function's with dashes."""
    if command.name:
        return command.name
    callback = command.callback
    return callback.__name__.lower().replace("_", "-") if callback is not None else None


def main() -> None:
    app = app_for(sys.argv[1:])
    try:
        app()
    except Exception as e:
        import typer

        from app.cli.common import State

        refusal = _refusal(e)
        if refusal is None or State.verbose:
            raise
        typer.echo(f"error: {refusal}", err=True)
        sys.exit(2)


def _refusal(error: Exception) -> GpuqError | None:
    """The one line to print for an error: gpuq's own, the state it keeps on disk (a home
    that cannot be written, a full disk, a damaged SQLite file), or a database that did not
    answer (sqlalchemy is looked up only when a command has loaded it)."""
    from app.cli.common import state_fault

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


def __getattr__(name: str) -> Any:
    if name == "cli":  # `from app.cli.main import cli`: the whole app, as tests invoke it
        return whole_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
