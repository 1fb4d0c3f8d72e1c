"""`gpuq why` and `gpuq limits`: why a job waits, and who may run how much."""

from __future__ import annotations

from typing import Any

import typer

from app.cli.common import JsonOpt, cli, client, print_json

limits_app = typer.Typer(rich_markup_mode=None, invoke_without_command=True,
                         help="Limits and fair-share weights per user and project.")


@cli.command()
def why(job_id: int = typer.Argument(..., help="A job id."), as_json: bool = JsonOpt) -> None:
    """Why a job is PENDING: a code and a sentence (the REASON of `gpuq queue`)."""
    out = client().call("why", job_id=job_id)
    if as_json:
        print_json(out)
        return
    from app.core.text import printable

    typer.echo(f"job {job_id} {out['status']}: {out['code']}: {printable(out['reason'])}")


def _who(user: str | None, project: str | None) -> tuple[str, str]:
    if (user is None) == (project is None):
        raise typer.BadParameter("name one of --user NAME or --project NAME ('*': everyone "
                                 "without an entry of their own)")
    return ("user", user) if user is not None else ("project", project or "")


UserOpt = typer.Option(None, "--user", help="A user's name ('*': every user).")
ProjectOpt = typer.Option(None, "--project", help="A project's name ('*': every project).")


@limits_app.callback()
def show(context: typer.Context, as_json: bool = JsonOpt) -> None:
    """Every user's and project's limits, weight, GPUs running, jobs pending and fair-share
    usage."""
    if context.invoked_subcommand is not None:
        return
    out = client().call("limits_table")
    if as_json:
        print_json(out)
        return
    from app.cli.render import limits_table

    limits_table(out)


def _number(text: str | None, kind: type[int] | type[float], flag: str) -> Any:
    if text is None:
        return None
    if text.lower() in ("none", "unset", "-"):
        return "clear"
    try:
        return kind(text)
    except ValueError:
        raise typer.BadParameter(f"{flag} takes a number, or 'none' to clear it") from None


def _duration(text: str | None, flag: str) -> Any:
    if text is None:
        return None
    if text.lower() in ("none", "unset", "-"):
        return "clear"
    from app.core.durations import parse_duration

    try:
        return parse_duration(text, flag)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def _shown(field: str, value: Any) -> str:
    if value is None:
        return "none"
    if field.endswith("_time_s"):
        from app.core.durations import format_duration

        return format_duration(value)
    return str(value)


@limits_app.command("set")
def set_(user: str | None = UserOpt, project: str | None = ProjectOpt,
         max_gpus: str | None = typer.Option(None, "--max-gpus",
                                             help="GPUs its jobs may hold at once ('none')."),
         max_pending: str | None = typer.Option(None, "--max-pending",
                                                help="Jobs it may have PENDING ('none')."),
         max_cpu_jobs: str | None = typer.Option(
             None, "--max-cpu-jobs", help="0-GPU jobs it may run at once ('none')."),
         max_priority: str | None = typer.Option(
             None, "--max-priority", help="The highest priority its jobs may be submitted "
             "at ('none': a user's default, 0)."),
         max_time: str | None = typer.Option(
             None, "--max-time", help="The longest time limit its jobs may ask for, e.g. "
             "2d ('none'); longer ones are refused at submission."),
         default_time: str | None = typer.Option(
             None, "--default-time", help="The time limit of its jobs that give no --time, "
             "e.g. 4h ('none')."),
         weight: str | None = typer.Option(None, "--weight",
                                           help="Fair-share weight (1: everyone's)."),
         default_project: str | None = typer.Option(
             None, "--default-project", help="A user's jobs' project when they name none.")
         ) -> None:
    """Set limits or a weight (an admin's); fields not named stay as they were."""
    kind, name = _who(user, project)
    given = {"max_gpus": _number(max_gpus, int, "--max-gpus"),
             "max_pending": _number(max_pending, int, "--max-pending"),
             "max_cpu_jobs": _number(max_cpu_jobs, int, "--max-cpu-jobs"),
             "max_priority": _number(max_priority, int, "--max-priority"),
             "max_time_s": _duration(max_time, "--max-time"),
             "default_time_s": _duration(default_time, "--default-time"),
             "weight": _number(weight, float, "--weight"),
             "default_project": None if default_project is None else
             ("clear" if default_project.lower() in ("none", "-") else default_project)}
    values = {k: None if v == "clear" else v for k, v in given.items() if v is not None}
    client().call("set_limits", kind=kind, name=name, values=values)
    shown = ", ".join(f"{k.removesuffix('_s')}={_shown(k, v)}" for k, v in values.items())
    typer.echo(f"{kind} {name}: {shown}")


@limits_app.command("clear")
def clear(user: str | None = UserOpt, project: str | None = ProjectOpt) -> None:
    """Drop a user's or project's entry (an admin's); a limits file's entry stays."""
    kind, name = _who(user, project)
    out = client().call("clear_limits", kind=kind, name=name)
    typer.echo(f"{kind} {name}: {'cleared' if out['cleared'] else 'had no entry'}")
