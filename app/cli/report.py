"""The commands that read the accounting record: report, and job (one job with its
attempts and their GPU figures)."""

from __future__ import annotations

from typing import Any

import typer

from app.cli.common import JsonOpt, cli, client, print_json


@cli.command()
def report(since: str = typer.Option("7d", "--since",
                                     help="Attempts that ended within this span: 7d, 12h, "
                                     "30m, 90s."),
           by: str = typer.Option("user", "--by", help="Group by user, project or launch."),
           as_json: bool = JsonOpt) -> None:
    """GPU use per user, project or launch: GPU-hours, jobs, success rate, mean wait,
    mean utilisation and peak memory (a named user sees their own)."""
    out = client().call("report", since=since, by=by)
    if as_json:
        print_json(out)
        return
    report_table(out)


@cli.command()
def job(job_id: int, as_json: bool = JsonOpt) -> None:
    """One job: its fields, its events and its attempts with their GPU figures."""
    out = client().call("job", job_id=job_id)
    if as_json:
        print_json(out)
        return
    job_view(out)


def _or_dash(value: Any, form: str = "{}") -> str:
    return "-" if value is None else form.format(value)


def _span(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"


def report_table(out: dict[str, Any]) -> None:
    """The `report` operation's groups, one row each, and their total GPU-hours."""
    from rich.table import Table

    from app.cli.render import _user_text, console

    table = Table(title=f"GPU use since {out['since'][:16].replace('T', ' ')} UTC, by "
                  f"{out['by']}", title_justify="left")
    for column in (out["by"], "GPU-hours", "jobs", "success", "mean wait", "mean util",
                   "peak memory"):
        table.add_column(column, justify="left" if column == out["by"] else "right")
    for key, t in out["groups"].items():
        table.add_row(_user_text(key), f"{t['gpu_hours']:.2f}", str(t["jobs"]),
                      _or_dash(None if t["success_rate"] is None
                               else 100 * t["success_rate"], "{:.0f}%"),
                      _span(t["mean_wait_s"]), _or_dash(t["mean_utilization_pct"], "{:.0f}%"),
                      _or_dash(t["peak_memory_mb"], "{} MiB"))
    console.print(table)
    total = sum(t["gpu_hours"] for t in out["groups"].values())
    console.print(f"{total:.2f} GPU-hours in all", highlight=False)


def job_view(out: dict[str, Any]) -> None:
    """A job's fields, its events, and its attempts with their GPU figures."""
    from rich.table import Table
    from rich.text import Text

    from app.cli.render import STATE_STYLE, _user_text, console
    from app.ops.rows import iso

    shown = ("id", "name", "status", "reason", "command", "owner", "project", "gpus",
             "gpu_ids", "host", "backend", "priority", "exit_code", "submitted_at",
             "started_at", "ended_at", "duration_s", "restart_count", "time_limit_s",
             "signal", "deadline", "after")
    width = max(map(len, shown))
    for field in shown:
        value = out.get(field)
        style = STATE_STYLE.get(str(value), "") if field == "status" else ""
        line = _user_text(f"{field:<{width}}  ")
        line.append(_user_text("-" if value is None else str(value), style=style))
        console.print(line, highlight=False)
    events = Table(title="events", title_justify="left")
    for column in ("at", "from", "to", "reason"):
        events.add_column(column)
    for event in out.get("events", []):
        events.add_row((iso(event["at"]) or "-")[11:23], event["from"] or "-", event["to"],
                       _user_text(event["reason"] or ""))
    console.print(events)
    console.print("attempts", highlight=False)
    for a in out.get("attempts", []):
        gpus = ",".join(map(str, a["gpu_ids"])) if a["gpu_ids"] else str(a["gpus"])
        line = Text(f"attempt {a['attempt']} ")
        line.append(a["outcome"], style=STATE_STYLE.get(a["outcome"], ""))
        line.append(" GPUs ")
        line.append(_user_text(f"{gpus} on {a['host'] or '-'}"))
        line.append(f"  {(a['started_at'] or '-')[11:23]} to {(a['ended_at'] or '-')[11:23]}"
                    f"  {a['gpu_seconds']:.1f} GPU-s  peak "
                    f"{_or_dash(a['peak_memory_mb'], '{} MiB')}  util "
                    f"{_or_dash(a['mean_utilization_pct'], '{:.0f}%')}  CPU "
                    f"{_or_dash(a.get('cpu_s'), '{:.1f} s')}  host memory "
                    f"{_or_dash(a.get('peak_host_memory_mb'), '{} MiB')}")
        console.print(line, highlight=False, soft_wrap=True)
    if not out.get("attempts"):
        console.print("no attempt has ended yet", style="dim")
