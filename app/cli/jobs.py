"""The commands of a submitting user: submit, launch, queue, launches, cancel, logs, wait,
status, attach, watch."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from app.cli.common import JsonOpt, NameOpt, cli, client, load_settings, print_json
from app.cli.options import job_options
from app.core.errors import GpuqError
from app.core.job_options import MAX_COMMAND_BYTES

if TYPE_CHECKING:
    from app.client import Client


def _parse_secrets(names: list[str], files: list[Path]) -> dict[str, str] | None:
    """--secret NAME takes the value from gpuq's own environment, --secret-file PATH from a
    file of NAME=VALUE lines that only its owner may read: a value never stands in the
    command line, which every local user sees in `ps`."""
    secrets: dict[str, str] = {}
    for path in files:
        secrets.update(_read_secret_file(path))
    for name in names:
        if "=" in name:
            raise GpuqError(f"--secret takes a NAME, not NAME=VALUE (a value in the command "
                            f"line is visible in `ps`): export it and pass --secret "
                            f"{name.partition('=')[0] or 'NAME'}, or list it in a "
                            "--secret-file PATH")
        if not name:
            raise GpuqError("--secret takes the NAME of an exported variable, got ''")
        if name not in os.environ:
            raise GpuqError(f"--secret {name}: no such variable in this environment; export "
                            f"{name} first, or list it in a --secret-file PATH")
        secrets[name] = os.environ[name]
    return secrets or None


def _read_secret_file(path: Path) -> dict[str, str]:
    """NAME=VALUE lines (blank lines and # comments skipped) of a file that neither its
    group nor others may read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as e:
        raise GpuqError(f"--secret-file {path}: {e.strerror}") from None
    if mode & 0o077:
        raise GpuqError(f"--secret-file {path} may be read by others (mode {mode & 0o777:o}); "
                        f"make it private with `chmod 600 {path}`")
    values = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise GpuqError(f"--secret-file {path}: line {lineno} is not NAME=VALUE")
        values[name.strip()] = value
    return values


SecretOpt = typer.Option([], "--secret", metavar="NAME",
                         help="An exported variable passed to the job as a secret: sealed, "
                         "kept out of the job table, logs and command lines.")
SecretFileOpt = typer.Option([], "--secret-file", metavar="PATH",
                             help="A file of NAME=VALUE lines (mode 600) passed as secrets.")
CommandArg = typer.Argument(
    ..., metavar="COMMAND", help=f"The command, after `--`; at most {MAX_COMMAND_BYTES // 1024} "
    "KiB (put a longer one in a script file and run that).")


@cli.command()
@job_options
def submit(options: dict[str, Any], command: list[str] = CommandArg,
           secret: list[str] = SecretOpt, secret_file: list[Path] = SecretFileOpt,
           allow_duplicate: bool = typer.Option(
               False, "--allow-duplicate",
               help="Queue it even when an identical job is pending or running."),
           as_json: bool = JsonOpt) -> None:
    """Queue one job and print its id. An identical job not yet ended is refused."""
    handle = client().submit(command, allow_duplicate=allow_duplicate,
                             secrets=_parse_secrets(secret, secret_file), **options)
    print_json({"job_id": handle.id}) if as_json else typer.echo(handle.id)


@cli.command()
@job_options
def launch(options: dict[str, Any], command: list[str] = CommandArg,
           num_jobs: int = typer.Option(..., "--num-jobs", "-n", help="Replicas to launch."),
           secret: list[str] = SecretOpt, secret_file: list[Path] = SecretFileOpt,
           wait: bool = typer.Option(False, "--wait", help="Show progress until all end."),
           as_json: bool = JsonOpt) -> None:
    """Queue N replicas of one command; each sees GPUQ_JOB_RANK and GPUQ_NUM_JOBS."""
    c = client()
    handle = c.launch(command, num_jobs, secrets=_parse_secrets(secret, secret_file),
                      **options)
    if as_json:
        print_json({"launch_id": handle.id, "job_ids": handle.job_ids})
    else:
        typer.echo(f"launch {handle.id}: jobs {handle.job_ids[0]}..{handle.job_ids[-1]}")
    if wait:
        from app.cli.render import progress

        counts = progress(c, handle.id, len(handle.job_ids))
        raise typer.Exit(0 if counts.get("SUCCEEDED", 0) == len(handle.job_ids) else 1)


@cli.command()
def queue(status: str | None = typer.Option(None, "--status", help="Only this state."),
          launch_id: int | None = typer.Option(None, "--launch", help="Only this launch."),
          name: str | None = NameOpt,
          limit: int = typer.Option(50, "--limit", help="Rows to show."),
          as_json: bool = JsonOpt) -> None:
    """List jobs, newest first (by rank within a launch)."""
    out = client().call("queue", status=status, launch_id=launch_id, name=name, limit=limit)
    if as_json:
        print_json(out)
        return
    from app.cli.render import launch_lines, queue_table

    if launch_id is not None:
        launch_lines(client().call("launches", launch_id=launch_id)["launches"])
    queue_table(out["jobs"], out["total"])


@cli.command()
def launches(as_json: bool = JsonOpt) -> None:
    """One line per recent launch: its replicas' counts per state."""
    out = client().call("launches")
    if as_json:
        print_json(out)
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
    out = client().call("cancel", ids=ids or None, name=name, launch_id=launch_id,
                         all_jobs=all_jobs)
    ended = out.get("ended") or {}
    if as_json:
        print_json(out)
    else:
        typer.echo(f"cancelled {len(out['cancelled'])}, stopping {len(out['cancelling'])}")
        for job_id, state in ended.items():
            typer.echo(f"job {job_id} already {state}; nothing to cancel", err=True)
    if ended:  # a job named that could not be cancelled: a script must not take it as done
        raise typer.Exit(1)


@cli.command()
def update(ids: list[int] | None = typer.Argument(None, help="Job ids."),
           launch_id: int | None = typer.Option(None, "--launch", help="Every replica of it."),
           time: str | None = typer.Option(
               None, "--time", metavar="TIME", help="A new time limit (e.g. 2h, or none), "
               "counted from each attempt's start; you may shorten your own, an admin may "
               "also lengthen one."),
           as_json: bool = JsonOpt) -> None:
    """Change jobs that have not ended, waiting or running: their time limit."""
    out = client().call("update", ids=ids or None, launch_id=launch_id, time=time)
    ended = out.get("ended") or {}
    if as_json:
        print_json(out)
    else:
        from app.core.durations import format_duration

        limit = out["time_limit_s"]
        typer.echo(f"updated {len(out['updated'])}: time limit "
                   f"{'none' if limit is None else format_duration(limit)}")
        for job_id, state in ended.items():
            typer.echo(f"job {job_id} already {state}; nothing to update", err=True)
    if ended:
        raise typer.Exit(1)


@cli.command()
def logs(job_id: int, follow: bool = typer.Option(False, "--follow", "-f"),
         head: int | None = typer.Option(None, "--head", metavar="N",
                                         help="Only the first N lines."),
         tail: int | None = typer.Option(None, "--tail", metavar="N",
                                         help="Only the last N lines (then on, with -f).")
         ) -> None:
    """Print a job's whole log; --follow keeps printing until the job ends."""
    if follow and head is not None:
        raise GpuqError("--head and --follow cannot be used together; --tail N -f follows "
                        "from the last N lines")
    pages = client().job(job_id).log_pages(head=head, tail=tail, follow=follow)
    for n, page in enumerate(pages):
        if page.get("where") and n == 0:
            typer.echo(f"job {job_id}'s output is kept in {page['where']}", err=True)
        sys.stdout.write(page["text"])
        sys.stdout.flush()


@cli.command()
def wait(ids: list[int] | None = typer.Argument(None, help="Job ids."),
         launch_id: int | None = typer.Option(None, "--launch", help="Every replica of it."),
         timeout: float | None = typer.Option(None, "--timeout", help="Seconds.")) -> None:
    """Wait for jobs to end; exit 0 when all SUCCEEDED, 1 otherwise."""
    if ids and launch_id is not None:
        raise GpuqError("name job ids or --launch L to wait for, not both")
    if not ids and launch_id is None:
        raise GpuqError("name job ids or --launch L to wait for")
    c = client()
    try:
        if launch_id is not None:
            raise typer.Exit(_wait_for_launch(c, launch_id, timeout))
        rows = c.wait(ids or [], timeout)
    except TimeoutError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from None
    bad = [r for r in rows if r["status"] != "SUCCEEDED"]
    for row in bad:
        typer.echo(f"job {row['id']}: {row['status']} (exit {row['exit_code']})", err=True)
    raise typer.Exit(1 if bad else 0)


SHOWN_PER_STATE = 20


def _wait_for_launch(c: Client, launch_id: int, timeout: float | None) -> int:
    """Wait on every replica by the launch's counts per state (cheap at 100,000); name
    some of those that did not succeed. The exit status: 0 when all SUCCEEDED, else 1."""
    launch = c.wait_launch(launch_id, timeout)
    bad = {state: n for state, n in sorted(launch.counts.items()) if state != "SUCCEEDED"}
    for state, n in bad.items():
        rows = c.call("queue", launch_id=launch_id, status=state, limit=SHOWN_PER_STATE)["jobs"]
        for row in rows:
            typer.echo(f"job {row['id']}: {row['status']} (exit {row['exit_code']})", err=True)
        if n > len(rows):
            typer.echo(f"... and {n - len(rows)} more {state}", err=True)
    return 1 if bad else 0


@cli.command()
def status(as_json: bool = JsonOpt) -> None:
    """GPUs per host, which job holds each, and job counts."""
    out = client().call("status")
    if as_json:
        print_json(out)
        return
    from app.cli.render import status_table

    status_table(out)


@cli.command()
def attach(job_id: int) -> None:
    """Attach to a running --tmux job (on the host it runs on); detach with Ctrl-b d."""
    own = load_settings()
    job = client().call("job", job_id=job_id)
    if not job.get("tmux"):
        raise GpuqError(f"job {job_id} was not started with --tmux; read it with `gpuq logs`")
    if job["status"] != "RUNNING":
        raise GpuqError(f"job {job_id} is {job['status']}; only a RUNNING job can be attached")
    from scheduler.worker.tmux import session_name, tmux_command

    argv = tmux_command(own.tmux_socket, "attach-session", "-t", session_name(job_id))
    os.execvp(argv[0], argv)


@cli.command()
def watch(path: Path = typer.Argument(..., help="The jobs file."),
          interval_s: float = typer.Option(1.0, "--interval", help="Seconds between checks."),
          once: bool = typer.Option(False, "--once", help="Read it once and exit.")) -> None:
    """Submit each line of a jobs file once, re-reading it whenever it changes.

    A bad line is reported by number and the other lines are submitted; with --once the
    exit status is 1 when a line was bad."""
    from scheduler.jobsfile import JobsFileWatcher

    if path.is_dir():
        raise GpuqError(f"{path} is a directory; name the jobs file in it, e.g. "
                        f"gpuq watch {path / 'jobs.txt'}")
    if not path.is_file():
        raise GpuqError(f"no jobs file {path}; create it (one job per line) and run again")
    c = client()
    watcher = JobsFileWatcher(path, lambda origin, specs, **more: c.call(
        "submit_many", origin=origin, specs=specs, **more), log_problems=False)
    while True:
        result = watcher.poll()
        bad = _show_poll(path, result)
        if once:
            if not watcher.settled:  # a last line without its newline, or lines that
                time.sleep(interval_s)  # left the file: once it stays the same
                bad = _show_poll(path, watcher.poll()) or bad
            if watcher.held is not None:
                typer.echo(f"{path}: line {watcher.held[0]} has no newline at its end and the "
                           "file is still changing; not submitted", err=True)
                bad = True
            raise typer.Exit(1 if bad else 0)
        time.sleep(interval_s)


def _show_poll(path: Path, result: Any) -> bool:
    """Print what one read of the jobs file did; True when a line was bad."""
    if result is None:
        return False
    for error in result.errors:
        typer.echo(f"{path}: {error}", err=True)
    for note in result.notes:
        typer.echo(f"{path}: {note}", err=True)
    if result.submitted:
        typer.echo(_submitted_line(result.submitted))
    return bool(result.errors)


SHOWN_IDS = 10


def _submitted_line(ids: list[int]) -> str:
    """How many jobs one read submitted, and their ids while few: a file of 10,000 lines
    is one short line, not 10,000 ids."""
    jobs = "job" if len(ids) == 1 else "jobs"
    if len(ids) <= SHOWN_IDS:
        return f"submitted {len(ids)} {jobs}: {', '.join(map(str, ids))}"
    return f"submitted {len(ids):,} {jobs}: ids {min(ids)}..{max(ids)}"


