"""The CLI's tables render every state (rich markup must not trip on any of them)."""

from __future__ import annotations

from rich.console import Console

from app.cli import render as views
from app.core.states import JobState


def test_queue_table_and_launch_lines_render_every_state(monkeypatch):
    console = Console(record=True, width=160)
    monkeypatch.setattr(views, "console", console)
    rows = [{"id": n, "name": None, "status": state.value, "gpu_ids": None, "gpus": 1,
             "host": None, "backend": "slurm", "backend_id": f"41_{n}",
             "submitted_at": "2026-11-22T09:00:00.000+00:00",
             "duration_s": None, "restart_count": 0} for n, state in enumerate(JobState)]
    views.queue_table(rows, len(rows))
    views.launch_lines([{"id": 1, "name": "sweep", "num_jobs": 12, "command": "train",
                         "counts": {s.value: 1 for s in JobState}}])
    text = console.export_text()
    assert all(state.value in text for state in JobState)
    assert "slurm 41_3" in text and "launch 1 sweep: 12 jobs" in text
