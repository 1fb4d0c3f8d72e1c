"""`gpuq`: the command line. Heavy imports stay inside commands so start-up stays fast."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from app.cli.db import db
from app.core.errors import GpuqError
from app.core.settings import Settings

if TYPE_CHECKING:
    from app.client import Client

cli = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="gpuq: a GPU job queue on Celery and Redis.")
cli.add_typer(db, name="db")

JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts.")


class State:
    verbose = False
    context: typer.Context | None = None  # the command line's; closes what commands open


def _settings() -> Settings:
    try:
        return Settings()
    except Exception as e:  # pydantic ValidationError: one line naming the variable
        raise GpuqError(f"bad settings: {e}".replace("\n", " ")) from e


def _client(transport: str | None = None) -> Client:
    """A client closed with the command, whether it ends well or with an error."""
    from app.client import Client

    client = Client(_settings(), transport)
    if State.context is not None:
        State.context.call_on_close(client.close)
    return client


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise GpuqError(f"--env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _parse_secrets(pairs: list[str]) -> dict[str, str] | None:
    """--secret NAME=VALUE, or --secret NAME to take the value from gpuq's own environment
    (which keeps it out of the shell's history and the process list)."""
    secrets = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            if key not in os.environ:
                raise GpuqError(f"--secret {key}: no such variable in this environment; pass "
                                "--secret NAME=VALUE or export NAME first")
            value = os.environ[key]
        if not key:
            raise GpuqError(f"--secret takes NAME=VALUE or NAME, got {pair!r}")
        secrets[key] = value
    return secrets or None


def _parse_ints(text: str | None, option: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise GpuqError(f"{option} takes comma-separated integers, e.g. 0,3") from None


@cli.callback()
def main_options(context: typer.Context,
                 verbose: bool = typer.Option(False, "--verbose", "-v",
                                              help="Show ids, hints and tracebacks.")) -> None:
    State.verbose = verbose
    State.context = context


def _spec_options(gpus: int, name: str | None, priority: int, env: list[str],
                  workdir: str | None, venv: str | None, conda_env: str | None,
                  max_restarts: int, recover_on_exit_codes: str | None,
                  gpu_ids: str | None, preflight: str | None, tmux: bool,
                  backend: str, after: list[str]) -> dict[str, Any]:
    return {
        "preflight": preflight, "tmux": tmux, "backend": backend,
        "gpus": gpus, "name": name, "priority": priority, "env": _parse_env(env),
        "workdir": str(Path(workdir).resolve()) if workdir else None, "venv": venv,
        "conda_env": conda_env, "max_restarts": max_restarts,
        "recover_exit_codes": _parse_ints(recover_on_exit_codes, "--recover-on-exit-codes"),
        "allowed_gpu_ids": _parse_ints(gpu_ids, "--gpu-ids"),
        "after": [i for text in after for i in _parse_ints(text, "--after") or []],
    }


GpusOpt = typer.Option(1, "--gpus", help="GPUs the job needs (0 for none).")
NameOpt = typer.Option(None, "--name", help="A name to find the job by.")
PriorityOpt = typer.Option(0, "--priority", help="Higher starts first.")
EnvOpt = typer.Option([], "--env", help="KEY=VALUE for the job's environment (repeatable).")
SecretOpt = typer.Option([], "--secret", help="NAME=VALUE (or NAME, from this environment) "
                         "for the job's environment, kept out of the job table and logs.")
WorkdirOpt = typer.Option(None, "--workdir", help="Directory the command runs in.")
VenvOpt = typer.Option(None, "--venv", help="A virtualenv to activate.")
CondaOpt = typer.Option(None, "--conda-env", help="A conda env to activate.")
RestartsOpt = typer.Option(0, "--max-restarts", help="Restarts after a failed attempt.")
RecoverOpt = typer.Option(None, "--recover-on-exit-codes",
                          help="Exit codes that restart without spending the budget, e.g. 137.")
GpuIdsOpt = typer.Option(None, "--gpu-ids", help="Only these GPU indices, e.g. 0,3.")
PreflightOpt = typer.Option(None, "--preflight",
                            help="A check to run on the job's GPUs first, e.g. nccl.")
TmuxOpt = typer.Option(False, "--tmux", help="Run in a tmux session (`gpuq attach ID`).")
BackendOpt = typer.Option("local", "--backend",
                          help="local (this cluster's GPU workers) or a batch backend: "
                          "slurm, aws_batch, kubernetes, process.")
AfterOpt = typer.Option([], "--after", help="Start only once these jobs have SUCCEEDED, "
                        "e.g. 12,13 (repeatable); cancelled if one of them does not.")
CommandArg = typer.Argument(..., help="The command, after `--`.")


@cli.command()
def submit(command: list[str] = CommandArg, gpus: int = GpusOpt, name: str | None = NameOpt,
           priority: int = PriorityOpt, env: list[str] = EnvOpt,
           workdir: str | None = WorkdirOpt, venv: str | None = VenvOpt,
           conda_env: str | None = CondaOpt, max_restarts: int = RestartsOpt,
           recover_on_exit_codes: str | None = RecoverOpt, gpu_ids: str | None = GpuIdsOpt,
           preflight: str | None = PreflightOpt, tmux: bool = TmuxOpt,
           backend: str = BackendOpt, secret: list[str] = SecretOpt,
           after: list[str] = AfterOpt,
           allow_duplicate: bool = typer.Option(
               False, "--allow-duplicate",
               help="Queue it even when an identical job is pending or running."),
           as_json: bool = JsonOpt) -> None:
    """Queue one job and print its id. An identical job not yet ended is refused."""
    options = _spec_options(gpus, name, priority, env, workdir, venv, conda_env, max_restarts,
                            recover_on_exit_codes, gpu_ids, preflight, tmux, backend, after)
    handle = _client().submit(command, allow_duplicate=allow_duplicate,
                              secrets=_parse_secrets(secret), **options)
    _print_json({"job_id": handle.id}) if as_json else typer.echo(handle.id)


@cli.command()
def launch(command: list[str] = CommandArg,
           num_jobs: int = typer.Option(..., "--num-jobs", "-n", help="Replicas to launch."),
           gpus: int = GpusOpt, name: str | None = NameOpt, priority: int = PriorityOpt,
           env: list[str] = EnvOpt, workdir: str | None = WorkdirOpt,
           venv: str | None = VenvOpt, conda_env: str | None = CondaOpt,
           max_restarts: int = RestartsOpt, recover_on_exit_codes: str | None = RecoverOpt,
           gpu_ids: str | None = GpuIdsOpt, preflight: str | None = PreflightOpt,
           tmux: bool = TmuxOpt, backend: str = BackendOpt, secret: list[str] = SecretOpt,
           after: list[str] = AfterOpt,
           wait: bool = typer.Option(False, "--wait", help="Show progress until all end."),
           as_json: bool = JsonOpt) -> None:
    """Queue N replicas of one command; each sees GPUQ_JOB_RANK and GPUQ_NUM_JOBS."""
    options = _spec_options(gpus, name, priority, env, workdir, venv, conda_env, max_restarts,
                            recover_on_exit_codes, gpu_ids, preflight, tmux, backend, after)
    client = _client()
    handle = client.launch(command, num_jobs, secrets=_parse_secrets(secret), **options)
    if as_json:
        _print_json({"launch_id": handle.id, "job_ids": handle.job_ids})
    else:
        typer.echo(f"launch {handle.id}: jobs {handle.job_ids[0]}..{handle.job_ids[-1]}")
    if wait:
        from app.cli.render import progress

        counts = progress(client, handle.id, len(handle.job_ids))
        raise typer.Exit(0 if counts.get("SUCCEEDED", 0) == len(handle.job_ids) else 1)


@cli.command()
def queue(status: str | None = typer.Option(None, "--status", help="Only this state."),
          launch_id: int | None = typer.Option(None, "--launch", help="Only this launch."),
          name: str | None = NameOpt,
          limit: int = typer.Option(50, "--limit", help="Rows to show."),
          as_json: bool = JsonOpt) -> None:
    """List jobs, newest first (by rank within a launch)."""
    out = _client().call("queue", status=status, launch_id=launch_id, name=name, limit=limit)
    if as_json:
        _print_json(out)
        return
    from app.cli.render import launch_lines, queue_table

    if launch_id is not None:
        launch_lines(_client().call("launches", launch_id=launch_id)["launches"])
    queue_table(out["jobs"], out["total"])


@cli.command()
def launches(as_json: bool = JsonOpt) -> None:
    """One line per recent launch: its replicas' counts per state."""
    out = _client().call("launches")
    if as_json:
        _print_json(out)
        return
    from app.cli.render import launch_lines

    launch_lines(out["launches"])


@cli.command()
def cancel(ids: list[int] | None = typer.Argument(None, help="Job ids."),
           name: str | None = NameOpt,
           launch_id: int | None = typer.Option(None, "--launch", help="Every replica of it."),
           all_jobs: bool = typer.Option(False, "--all", help="Every job not yet ended."),
           as_json: bool = JsonOpt) -> None:
    """Cancel jobs: waiting ones never start; running ones are stopped."""
    out = _client().call("cancel", ids=ids or None, name=name, launch_id=launch_id,
                         all_jobs=all_jobs)
    if as_json:
        _print_json(out)
    else:
        typer.echo(f"cancelled {len(out['cancelled'])}, stopping {len(out['cancelling'])}")


@cli.command()
def logs(job_id: int, follow: bool = typer.Option(False, "--follow", "-f")) -> None:
    """Print a job's output; --follow keeps printing until the job ends."""
    from app.core.states import JobState

    client = _client()
    offset = 0
    while True:
        out = client.call("logs", job_id=job_id, offset=offset)
        if out.get("where") and not offset:
            typer.echo(f"job {job_id}'s output is kept in {out['where']}", err=True)
        sys.stdout.write(out["text"])
        sys.stdout.flush()
        offset = out["offset"]
        if not follow or (JobState(out["status"]).terminal and not out["text"]):
            return
        if not out["text"]:
            time.sleep(0.3)


@cli.command()
def wait(ids: list[int] | None = typer.Argument(None, help="Job ids."),
         launch_id: int | None = typer.Option(None, "--launch"),
         timeout: float | None = typer.Option(None, "--timeout", help="Seconds.")) -> None:
    """Wait for jobs to end; exit 0 when all SUCCEEDED, 1 otherwise."""
    client = _client()
    if launch_id is not None:
        ids = [r["id"] for r in client.call("queue", launch_id=launch_id, limit=10_000)["jobs"]]
    if not ids:
        raise GpuqError("name job ids or --launch L to wait for")
    try:
        rows = client.wait(ids, timeout)
    except TimeoutError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from None
    bad = [r for r in rows if r["status"] != "SUCCEEDED"]
    for row in bad:
        typer.echo(f"job {row['id']}: {row['status']} (exit {row['exit_code']})", err=True)
    raise typer.Exit(1 if bad else 0)


@cli.command()
def status(as_json: bool = JsonOpt) -> None:
    """GPUs per host, which job holds each, and job counts."""
    out = _client().call("status")
    if as_json:
        _print_json(out)
        return
    from app.cli.render import status_table

    status_table(out)


@cli.command()
def attach(job_id: int) -> None:
    """Attach to a running --tmux job (on the host it runs on); detach with Ctrl-b d."""
    settings = _settings()
    job = _client().call("job", job_id=job_id)
    if not job.get("tmux"):
        raise GpuqError(f"job {job_id} was not started with --tmux; read it with `gpuq logs`")
    if job["status"] != "RUNNING":
        raise GpuqError(f"job {job_id} is {job['status']}; only a RUNNING job can be attached")
    from scheduler.worker.tmux import session_name, tmux_command

    argv = tmux_command(settings.tmux_socket, "attach-session", "-t", session_name(job_id))
    os.execvp(argv[0], argv)


@cli.command()
def watch(path: Path = typer.Argument(..., help="The jobs file."),
          interval_s: float = typer.Option(1.0, "--interval", help="Seconds between checks."),
          once: bool = typer.Option(False, "--once", help="Read it once and exit.")) -> None:
    """Submit each line of a jobs file once, re-reading it whenever it changes."""
    from scheduler.jobsfile import JobsFileWatcher

    client = _client()
    watcher = JobsFileWatcher(path, lambda origin, specs: client.call(
        "submit_many", origin=origin, specs=specs))
    while True:
        result = watcher.poll()
        if result is not None:
            for error in result.errors:
                typer.echo(f"{path}: {error}", err=True)
            if result.submitted:
                typer.echo(f"submitted {', '.join(map(str, result.submitted))}")
        if once:
            raise typer.Exit(1 if result is not None and result.errors else 0)
        time.sleep(interval_s)


@cli.command()
def config() -> None:
    """Print the effective settings, secrets masked."""
    _print_json(_settings().masked())


@cli.command()
def up(procfile: Path | None = typer.Option(
           None, help="Processes to run [default: deploy/Procfile.dev]."),
       flower: bool = typer.Option(True, "--flower/--no-flower", help="Run Flower."),
       jobs_file: Path | None = typer.Option(None, "--jobs-file",
                                             help="Watch this jobs file too.")) -> None:
    """Run the whole stack in the foreground until Ctrl-C."""
    from app.stack.up import default_procfile, run_stack

    settings = _settings()
    run_stack(settings, procfile or default_procfile(), flower,
              jobs_file or settings.jobs_file)


@cli.command()
def worker() -> None:
    """Run this host's GPU workers (one Celery worker per GPU)."""
    from app.stack.host import run_host_workers

    run_host_workers(_settings())


def _exec_celery(build: Callable[[Settings], str]) -> None:
    import shlex

    argv = shlex.split(build(_settings()))
    os.execv(argv[0], argv)


@cli.command("control-worker")
def control_worker() -> None:
    """Run the worker of the control queue (remote operations, dispatch)."""
    from app.stack.host import control_worker_command

    _exec_celery(control_worker_command)


@cli.command()
def beat() -> None:
    """Run Celery beat: the periodic dispatch pass. Run exactly one per cluster."""
    from app.stack.up import beat_command

    _exec_celery(beat_command)


@cli.command("flower")
def flower_cmd(port: int | None = typer.Option(
        None, "--port", help="Listen here [default: $PORT if set (a Procfile's web "
        "process), else GPUQ_FLOWER_PORT].")) -> None:
    """Run Flower (Celery monitoring), bound to 127.0.0.1 unless GPUQ_FLOWER_ADDRESS says;
    beyond loopback only with GPUQ_FLOWER_BASIC_AUTH."""
    import shlex

    from app.stack.up import check_flower_bind, flower_command, flower_environment

    settings = _settings()
    if port is None and os.environ.get("PORT"):
        try:
            port = int(os.environ["PORT"])
        except ValueError:
            raise GpuqError(f"PORT must be a port number, got {os.environ['PORT']!r}") from None
    if port is not None:
        settings = settings.model_copy(update={"flower_port": port})
    check_flower_bind(settings)
    argv = shlex.split(flower_command(settings))
    os.execve(argv[0], argv, flower_environment(settings, os.environ))


@cli.command()
def dashboard(address: str | None = typer.Option(None, "--address",
                                                 help="Bind here (GPUQ_DASHBOARD_ADDRESS)."),
              port: int | None = typer.Option(None, "--port",
                                              help="Listen here (GPUQ_DASHBOARD_PORT).")) -> None:
    """Serve the web dashboard and its JSON API, on 127.0.0.1 unless told otherwise."""
    from app.dashboard import serve

    settings = _settings()
    changes = {k: v for k, v in (("dashboard_address", address), ("dashboard_port", port))
               if v is not None}
    serve(settings.model_copy(update=changes))


def main() -> None:
    try:
        cli()
    except GpuqError as e:
        if State.verbose:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
