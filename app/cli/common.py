"""The `gpuq` app, and what its commands share: settings, a client closed with the command,
JSON output. Heavy imports stay inside commands, so that start-up stays fast."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import typer

from app.core import errors
from app.core.errors import BrokerUnavailable, DatabaseUnavailable, GpuqError

if TYPE_CHECKING:
    from app.client import Client
    from app.core.settings import Settings

# Plain help: rich's help renderer costs more start-up than the rest of the CLI together.
cli = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="gpuq: a GPU job queue on Celery and Redis.")

JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts.")
NameOpt = typer.Option(None, "--name", help="A name to find the job by.")


class State:
    verbose = False
    context: typer.Context | None = None  # the command line's; closes what commands open
    settings: Settings | None = None  # the command's, once loaded: where its state is kept
    # An everyday command (app/cli/main.py NEARBY): its client may reach the stack's
    # dashboard without loading the settings.
    nearby = False
    client: Client | None = None


def load_settings() -> Settings:
    from app.core.settings import Settings

    try:
        State.settings = Settings()
    except Exception as e:  # pydantic ValidationError: one line naming the variable
        raise GpuqError(f"bad settings: {e}".replace("\n", " ")) from e
    return State.settings


# Errors that may come from the state gpuq keeps on disk, whatever the command.
_STATE_ERRORS = (OSError, DatabaseUnavailable, BrokerUnavailable)


def state_fault(error: Exception) -> GpuqError | None:
    """The one line for an error that came from GPUQ_HOME or its SQLite file: read-only,
    full, or damaged (app/core/errors.py state_fault); None for any other error."""
    settings = State.settings or (State.client._settings if State.client else None)
    if settings is None:
        return None
    exc = sys.modules.get("sqlalchemy.exc")
    from_store = exc is not None and isinstance(error, exc.SQLAlchemyError)
    if not (from_store or isinstance(error, _STATE_ERRORS)):
        return None
    return errors.state_fault(error, settings.home, settings.sqlite_file)


def client(transport: str | None = None) -> Client:
    """A client closed with the command, whether it ends well or with an error. An
    everyday command's goes over http where the environment names a dashboard or the
    stack's socket is there (app/client/http.py endpoint_from_environment); it loads the
    settings only when it turns to run in process."""
    from app.client import Client

    if State.nearby and transport is None:
        from app.client.http import endpoint_from_environment

        endpoint = endpoint_from_environment()
        if endpoint is not None:
            return _closed_with_command(Client(endpoint=endpoint))
    return _closed_with_command(Client(load_settings(), transport))


def _closed_with_command(client: Client) -> Client:
    State.client = client
    if State.context is not None:
        State.context.call_on_close(client.close)
    return client


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))



@cli.callback()
def main_options(context: typer.Context,
                 verbose: bool = typer.Option(False, "--verbose", "-v",
                                              help="Show ids, hints and tracebacks.")) -> None:
    State.verbose = verbose
    State.context = context


