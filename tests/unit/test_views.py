"""The CLI's tables render every state (rich markup must not trip on any of them)."""

from __future__ import annotations

from rich.console import Console

from app.cli import render as views
from app.core.states import JobState
from app.ops.rows import JobRow, LaunchRow
from app.store.models import Job, Launch


def test_queue_table_and_launch_lines_render_every_state(monkeypatch):
    console = Console(record=True, width=160)
    monkeypatch.setattr(views, "console", console)
    rows = [JobRow.of(Job(id=n, command="train", state=state.value, backend="slurm",
                          backend_id=f"41_{n}", submitted_at=1795338000.0)).dump()
            for n, state in enumerate(JobState, start=1)]
    views.queue_table(rows, len(rows))
    launch = Launch(id=1, name="sweep", num_jobs=12, command="train")
    views.launch_lines([LaunchRow.of(launch, {s.value: 1 for s in JobState}).dump()])
    text = console.export_text()
    assert all(state.value in text for state in JobState)
    assert "slurm 41_3" in text and "launch 1 sweep: 12 jobs" in text
