"""The commands that run gpuq's servers: up, worker, control-worker, beat, flower,
dashboard; and config."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from app.cli.common import cli, load_settings, print_json
from app.core.errors import GpuqError

if TYPE_CHECKING:
    from app.core.settings import Settings


@cli.command()
def config(show_secrets: bool = typer.Option(
        False, "--show-secrets", help="Show the secrets too, generated ones included: the "
        "dashboard's token, Flower's password, the embedded Redis's password.")) -> None:
    """Print the effective settings, secrets masked unless --show-secrets."""
    settings = load_settings()
    print_json(_with_secrets(settings) if show_secrets else settings.masked())


def _with_secrets(settings: Settings) -> dict[str, object]:
    """The settings unmasked, with the secrets gpuq generates for itself in GPUQ_HOME: the
    dashboard's token and Flower's password (made now if missing, as their servers would),
    and the embedded Redis's password once its server made it. Only the home's owner can
    read them."""
    from app.dashboard import dashboard_token
    from app.stack.flower import flower_basic_auth
    from app.store.embedded_redis import PASSWORD_FILE, password

    values: dict[str, object] = settings.model_dump(mode="json")
    values["dashboard_token"] = dashboard_token(settings)
    values["flower_basic_auth"] = flower_basic_auth(settings)
    if not settings.redis_url and (settings.embedded_redis_password or
                                   (settings.redis_dir / PASSWORD_FILE).exists()):
        values["embedded_redis_password"] = password(settings)
    return values


@cli.command()
def up(procfile: Path | None = typer.Option(
           None, help="Processes to run [default: deploy/Procfile.dev]."),
       flower: bool = typer.Option(True, "--flower/--no-flower", help="Run Flower."),
       jobs_file: Path | None = typer.Option(None, "--jobs-file",
                                             help="Watch this jobs file too.")) -> None:
    """Run the whole stack in the foreground until Ctrl-C or SIGTERM, which stop everything
    it started, running jobs included (each requeued or ended by its restart policy). One
    per host and GPUQ_HOME when its Procfile runs `gpuq worker`."""
    from app.stack.up import default_procfile, run_stack

    settings = load_settings()
    run_stack(settings, procfile or default_procfile(), flower,
              jobs_file or settings.jobs_file)


@cli.command()
def worker() -> None:
    """Run this host's GPU workers (one Celery worker per GPU), one per host and GPUQ_HOME;
    Ctrl-C or SIGTERM stops them and their jobs (each requeued or ended by its policy)."""
    from app.stack.host import run_host_workers

    run_host_workers(load_settings())


def _exec_celery(build: Callable[[Settings], str]) -> None:
    import shlex

    argv = shlex.split(build(load_settings()))
    os.execv(argv[0], argv)


@cli.command("control-worker")
def control_worker() -> None:
    """Run the worker of the control queue (remote operations, dispatch)."""
    from app.stack.commands import control_worker_command

    _exec_celery(control_worker_command)


@cli.command()
def beat() -> None:
    """Run Celery beat: the periodic dispatch pass. Run exactly one per cluster."""
    from app.stack.commands import beat_command

    _exec_celery(beat_command)


@cli.command("flower")
def flower_cmd(port: int | None = typer.Option(
        None, "--port", help="Listen here [default: $PORT if set (a Procfile's web "
        "process), else GPUQ_FLOWER_PORT].")) -> None:
    """Run Flower (Celery monitoring), bound to 127.0.0.1 unless GPUQ_FLOWER_ADDRESS says;
    beyond loopback only with GPUQ_FLOWER_BASIC_AUTH."""
    import shlex

    from app.stack.commands import flower_command
    from app.stack.flower import check_flower_bind, flower_environment

    settings = load_settings()
    if port is None and os.environ.get("PORT"):
        try:
            port = int(os.environ["PORT"])
        except ValueError:
            raise GpuqError(f"PORT must be a port number, got {os.environ['PORT']!r}") from None
    if port is not None:
        settings = settings.model_copy(update={"flower_port": _port(port)})
    check_flower_bind(settings)
    argv = shlex.split(flower_command(settings))
    os.execve(argv[0], argv, flower_environment(settings, os.environ))


@cli.command()
def dashboard(address: str | None = typer.Option(None, "--address",
                                                 help="Bind here (GPUQ_DASHBOARD_ADDRESS)."),
              port: int | None = typer.Option(None, "--port",
                                              help="Listen here (GPUQ_DASHBOARD_PORT)."),
              url: bool = typer.Option(False, "--url", help="Print the login address (with "
                                       "the token) and exit, serving nothing.")) -> None:
    """Serve the web dashboard and its JSON API, on 127.0.0.1 unless told otherwise. Every
    request needs its token (GPUQ_DASHBOARD_TOKEN, else one kept in GPUQ_HOME): open the
    login address `gpuq dashboard --url` prints once, or send `Authorization: Bearer TOKEN`.
    The token is printed only on that request, never on starting."""
    from app.dashboard import dashboard_token, login_url, serve

    settings = load_settings()
    if port is not None:
        _port(port)
    changes = {k: v for k, v in (("dashboard_address", address), ("dashboard_port", port))
               if v is not None}
    settings = settings.model_copy(update=changes)
    if url:
        print(login_url(settings, dashboard_token(settings)))
        return
    serve(settings)


def _port(port: int) -> int:
    """A TCP port to listen on, refused by name before any server starts."""
    if not 1 <= port <= 65535:
        raise GpuqError(f"--port takes a TCP port number from 1 to 65535, got {port}")
    return port
