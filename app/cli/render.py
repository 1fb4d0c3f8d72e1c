"""Rich tables and progress bars for the CLI."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from app.core.text import printable

if TYPE_CHECKING:
    from app.client import Client

# A row as the operations answer it (app/ops/rows.py JobRow.dump()), read by attribute:
# it was validated where it was made, and pydantic would cost the CLI more than the rest.
Row = SimpleNamespace
# The fields a row from an older stack may lack.
ROW_DEFAULTS = {"owner": "", "project": "", "why": None, "why_reason": None}

console = Console()

STATE_STYLE = {"SUCCEEDED": "green", "FAILED": "red", "RUNNING": "cyan", "PENDING": "yellow",
               "CANCELLED": "magenta", "LOST": "red", "FAILED_NO_RESOURCE": "red",
               "FAILED_PRECHECK": "red", "TIMEOUT": "red"}


def _short_time(iso: str | None) -> str:
    return iso[11:19] if iso else "-"


def _where(row: Row) -> Text:
    """The host of a local job; the backend and its id for a batch job."""
    if row.backend == "local":
        return _user_text(row.host or "-")
    return _user_text(f"{row.backend} {row.backend_id or '(not submitted)'}")


def _user_text(value: str, style: str = "") -> Text:
    """Text another user (or a host) wrote, shown as it is: control characters escaped,
    never read as Rich markup."""
    return Text(printable(value), style=style)


def queue_table(answer: list[dict[str, Any]], total: int) -> None:
    """A page of the `queue` operation's rows; a user column when the page holds several
    users' jobs, a reason column when some row has one (why a PENDING job waits)."""
    rows = [Row(**{**ROW_DEFAULTS, **row}) for row in answer]
    table = Table(title=f"{len(rows)} of {total} jobs", title_justify="left")
    users = len({row.owner for row in rows}) > 1
    reasons = any(row.why or row.reason for row in rows)
    columns = ["id", "name", *(["user"] if users else []), "status", "gpus", "where",
               "submitted", "duration", "restarts", *(["reason"] if reasons else [])]
    for column in columns:
        table.add_column(column, justify="right" if column in ("id", "restarts") else "left",
                         overflow="fold" if column in ("where", "reason") else "ellipsis",
                         no_wrap=column in ("id", "status"),
                         min_width=8 if column == "name" else None)
    for row in rows:
        style = STATE_STYLE.get(row.status, "")
        gpus = ",".join(map(str, row.gpu_ids)) if row.gpu_ids else str(row.gpus)
        duration = f"{row.duration_s:.1f}s" if row.duration_s is not None else "-"
        cells: list[Text | str] = [str(row.id), _user_text(row.name or "-")]
        if users:
            cells.append(_user_text(row.owner))
        cells += [Text(row.status, style=style), gpus, _where(row),
                  _short_time(row.submitted_at), duration, str(row.restart_count)]
        if reasons:
            cells.append(_user_text(f"{row.why}: {row.why_reason}" if row.why
                                    else (row.reason or "")))
        table.add_row(*cells)
    console.print(table)


def launch_lines(answer: list[dict[str, Any]]) -> None:
    """`launch 3 sweep: 10000 jobs  succeeded=9990 failed=2 running=8  python train.py`"""
    for launch in (Row(**row) for row in answer):
        line = Text(f"launch {launch.id} ")
        line.append(_user_text(launch.name or ""))
        line.append(f": {launch.num_jobs} jobs ")
        for state, n in sorted(launch.counts.items()):
            line.append(f" {state.lower()}={n}", style=STATE_STYLE.get(state, "default"))
        line.append("  ")
        line.append(_user_text(launch.command, style="dim"))
        console.print(line, highlight=False)


def status_table(status: dict[str, Any]) -> None:
    table = Table(title="GPUs", title_justify="left")
    for column in ("host", "gpu", "name", "memory", "util", "worker", "job", "foreign use"):
        table.add_column(column)
    for host in status["hosts"]:
        for gpu in host["gpus"]:
            reading = gpu.get("reading") or {}
            memory = (f"{reading['memory_used_mb']}/{reading['memory_total_mb']} MiB"
                      if reading else "-")
            util = f"{reading['utilization_pct']}%" if reading else "-"
            foreign = "[red]busy[/]" if reading.get("foreign") else "-"
            table.add_row(_user_text(host["host"]), str(gpu["index"]),
                          _user_text(str(gpu.get("name", "-"))), memory, util,
                          "[green]up[/]" if gpu["alive"] else "[red]down[/]",
                          str(gpu["job_id"] or "-"), foreign)
    console.print(table)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(status["counts"].items())) or "no jobs"
    console.print(f"jobs: {counts}")
    if status.get("limits"):
        limits_table(status["limits"])
    if status.get("stale_workers"):
        console.print(f"[red]stale workers[/] (no heartbeat): "
                      f"{', '.join(status['stale_workers'])}", highlight=False)
    for program in status.get("programs", []):
        console.print(program_line(program), highlight=False)
    if status.get("flower"):  # None: no Flower answers (a stack run with --no-flower)
        console.print(f"flower: {status['flower']}", highlight=False)
    if status.get("dashboard"):
        console.print(f"dashboard: {status['dashboard']}", highlight=False)


def limits_table(out: dict[str, Any]) -> None:
    """The `limits_table` operation: per user and project, limits, weight and use now."""
    share = (f"fair share by {out['fair_share_by']}, half-life {out['half_life_days']:g} days"
             if out["fair_share"] else "fair share off (oldest first within a priority)")
    if out.get("open_projects"):
        console.print("projects open to everyone (GPUQ_OPEN_PROJECTS)", soft_wrap=True)
    table = Table(title=f"limits ({share}; file {out['file']})", title_justify="left")
    # max_gpus is shown as the bound of GPUs running (2/4), which keeps ten columns on a
    # narrow terminal.
    for column in ("kind", "name", "max pending", "max cpu jobs", "max priority", "weight",
                   "default project", "gpus running", "pending", "usage (GPU-h)"):
        table.add_column(column)
    for e in out["entries"]:
        table.add_row(e["kind"], _user_text(e["name"]), _or_dash(e["max_pending"]),
                      _or_dash(e.get("max_cpu_jobs")), _or_dash(e.get("max_priority")),
                      f"{e['weight']:g}", _user_text(e["default_project"] or "-"),
                      _usage_of(e["running_gpus"], e["max_gpus"]),
                      "-" if e["pending"] is None else _usage_of(e["pending"], e["max_pending"]),
                      f"{e['usage_gpu_hours']:.2f}")
    console.print(table)
    # Time limits on lines of their own: the table keeps ten columns on a narrow terminal.
    for e in out["entries"]:
        if e.get("default_time_s") is not None or e.get("max_time_s") is not None:
            console.print(f"{e['kind']} {_user_text(e['name'])}: time limit "
                          f"{_times(e.get('default_time_s'), e.get('max_time_s'))} "
                          "(default/max)", highlight=False, soft_wrap=True)


def _times(default_s: int | None, max_s: int | None) -> str:
    if default_s is None and max_s is None:
        return "-"
    from app.core.durations import format_duration

    return "/".join("-" if s is None else format_duration(s) for s in (default_s, max_s))


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _usage_of(value: int, limit: int | None) -> str:
    return f"{value}/{limit}" if limit is not None else str(value)


def program_line(p: dict[str, Any]) -> str:
    """`crash loop: uphost/gpu exited 5 times in 5 min, last exit code 3, retry in 8s`"""
    label = "[red]crash loop[/]" if p["crash_loop"] else "[yellow]restarted[/]"
    return (f"{label}: {p['host']}/{p['program']} exited {p['exits_in_window']} times in "
            f"{p['window_s'] / 60:.0f} min ({p['exits']} in all), last exit code "
            f"{p['exit_code']}, retry in {p['backoff_s']:.0f}s")


def progress(client: Client, launch_id: int, total: int, poll_s: float = 0.3) -> dict[str, int]:
    """A progress bar over a launch until every replica ends; return the final counts."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("launch {task.fields[launch]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[summary]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("launch", total=total, launch=launch_id, summary="")
        while True:
            launch = Row(**client.call("launches", launch_id=launch_id)["launches"][0])
            summary = " ".join(f"{k.lower()}={v}" for k, v in sorted(launch.counts.items()))
            bar.update(task, completed=launch.done, summary=summary)
            if launch.done >= total:
                return launch.counts
            time.sleep(poll_s)
