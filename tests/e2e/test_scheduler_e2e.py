"""The scheduler through real workers: priority, no starvation, busy GPUs, restarts,
preflight, tmux mode, and the CLI's jobs-file watcher."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.client import Client
from app.core.errors import InvalidJobSpec
from scheduler.worker.monitor import write_fake_foreign_use
from scheduler.worker.tmux import session_name, tmux_command
from tests.support.servers import server_env, until

pytestmark = pytest.mark.e2e


def _events(client: Client, job_id: int) -> list[tuple[str, str | None]]:
    return [(e["to"], e["reason"]) for e in client.call("job", job_id=job_id)["events"]]


def test_higher_priority_starts_first_then_fifo(client: Client, tmp_path: Path):
    gate, order = tmp_path / "gate", tmp_path / "order"
    blocker = client.submit(f"while [ ! -f {gate} ]; do sleep 0.05; done", gpus=2)
    until(lambda: blocker.status == "RUNNING")
    queued = [client.submit(f"echo {label} >> {order}", gpus=2, priority=priority)
              for label, priority in [("low-a", 0), ("low-b", 0), ("high", 5)]]
    gate.touch()
    client.wait([j.id for j in queued], timeout_s=60)
    assert order.read_text().split() == ["high", "low-a", "low-b"]


def test_waiting_two_gpu_job_is_not_starved_by_one_gpu_jobs(client: Client, tmp_path: Path):
    gate = tmp_path / "gate"
    holder = client.submit(f"while [ ! -f {gate} ]; do sleep 0.05; done")
    until(lambda: holder.status == "RUNNING")
    big = client.submit("echo big", gpus=2)
    smalls = [client.submit(f"echo small {n}") for n in range(4)]
    time.sleep(1.0)  # a free GPU sits idle for the big job rather than going to a small one
    assert big.status == "PENDING"
    assert {s.status for s in smalls} == {"PENDING"}
    gate.touch()
    rows = {r["id"]: r for r in client.wait([big.id, *[s.id for s in smalls]], timeout_s=60)}
    assert all(rows[s.id]["started_at"] >= rows[big.id]["started_at"] for s in smalls)


def test_gpu_busy_with_foreign_processes_is_skipped(client: Client, stack_settings):
    home = stack_settings.home
    write_fake_foreign_use(home, 1, 40_000, 95)
    try:
        until(lambda: client.call("status")["hosts"][0]["gpus"][1]["reading"]["foreign"])
        jobs = [client.submit(f"echo where {n}") for n in range(3)]
        rows = client.wait([j.id for j in jobs], timeout_s=60)
        assert [r["gpu_ids"] for r in rows] == [[0], [0], [0]]
    finally:
        write_fake_foreign_use(home, 1, 0, 0)
    until(lambda: not client.call("status")["hosts"][0]["gpus"][1]["reading"]["foreign"])


def test_recovering_exit_code_restarts_without_spending_the_budget(client: Client,
                                                                    tmp_path: Path):
    marker = tmp_path / "first-attempt-done"
    job = client.submit(f"if [ -f {marker} ]; then echo second; else touch {marker}; exit 143; fi",
                        recover_exit_codes=[143])
    assert job.wait(timeout_s=60) == "SUCCEEDED"
    row = job.row()
    assert row["restart_count"] == 0
    states = [state for state, _ in _events(client, job.id)]
    assert states == ["PENDING", "STARTING", "RUNNING", "RECOVERING", "PENDING", "STARTING",
                      "RUNNING", "SUCCEEDED"]


def test_zero_gpu_job_runs_without_gpus(client: Client):
    job = client.submit("echo cpu-only [$CUDA_VISIBLE_DEVICES]", gpus=0)
    assert job.wait(timeout_s=30) == "SUCCEEDED"
    assert "cpu-only []" in job.logs() and job.row()["gpu_ids"] == []


@pytest.mark.parametrize(("check", "state", "reason", "log_text"), [
    ("fake-pass", "SUCCEEDED", "preflight fake-pass passed: all good", "all good"),
    ("fake-skip", "SUCCEEDED", "preflight fake-skip skipped: no devices here", "no devices"),
    ("fake-fail", "FAILED_PRECHECK", "preflight fake-fail failed (exit 1): broken link",
     "broken link"),
    # The real check on this machine: no torch with CUDA, so it is skipped with the reason.
    ("nccl", "SUCCEEDED", "preflight nccl skipped: torch is not installed", "torch"),
])
def test_preflight_passes_skips_or_fails_the_job(client: Client, check, state, reason,
                                                 log_text):
    job = client.submit(f"echo main-command {check}", gpus=2, preflight=check)
    assert job.wait(timeout_s=60) == state
    assert (state if state == "FAILED_PRECHECK" else "STARTING", reason) in _events(
        client, job.id)
    logs = job.logs()
    assert log_text in logs
    assert ("main-command" in logs) is (state == "SUCCEEDED")


def test_unknown_preflight_is_refused(client: Client):
    with pytest.raises(InvalidJobSpec, match="unknown preflight 'fast'; choose one of nccl"):
        client.submit("true", preflight="fast")


def test_tmux_job_is_attachable_logged_and_cancellable(client: Client, stack_settings):
    socket = stack_settings.tmux_socket
    job = client.submit(["bash", "-c", "echo hello-from-tmux; sleep 60"], tmux=True)
    until(lambda: "hello-from-tmux" in job.logs())
    pane = subprocess.run(tmux_command(socket, "capture-pane", "-p", "-t", session_name(job.id)),
                          capture_output=True, text=True, check=True).stdout
    assert "hello-from-tmux" in pane
    assert job.cancel()["cancelling"] == [job.id]
    assert job.wait(timeout_s=30) == "CANCELLED"
    alive = subprocess.run(tmux_command(socket, "has-session", "-t", session_name(job.id)),
                           capture_output=True)
    assert alive.returncode != 0


def test_tmux_job_records_its_exit_code(client: Client):
    job = client.submit("echo done-in-tmux; exit 5", tmux=True)
    assert job.wait(timeout_s=30) == "FAILED"
    assert job.row()["exit_code"] == 5 and "done-in-tmux" in job.logs()


def test_watch_once_submits_lines_and_reports_bad_ones(client: Client, stack_settings,
                                                       tmp_path: Path):
    path = tmp_path / "jobs.txt"
    path.write_text("name=from-file -- echo watched\ngpus=lots -- echo bad\n")
    gpuq = str(Path(sys.executable).parent / "gpuq")
    result = subprocess.run([gpuq, "watch", str(path), "--once"], env=server_env(stack_settings),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "line 2: gpus takes an integer" in result.stderr
    rows = client.call("queue", name="from-file")["jobs"]
    assert len(rows) == 1
    assert client.job(rows[0]["id"]).wait(timeout_s=30) == "SUCCEEDED"


def test_venv_is_activated_for_the_job(client: Client, tmp_path: Path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    job = client.submit('echo "python=$(command -v python) venv=$VIRTUAL_ENV"', venv=str(venv))
    assert job.wait(timeout_s=30) == "SUCCEEDED"
    assert f"python={venv}/bin/python venv={venv}" in job.logs()


def test_conda_env_is_activated_for_the_job(client: Client, tmp_path: Path):
    # A stand-in `conda` that speaks the shell-hook protocol the real one does.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "conda"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "shell.bash hook" ] && '
                    "echo 'conda() { [ \"$1\" = activate ] && export CONDA_DEFAULT_ENV=$2; }'\n")
    fake.chmod(0o755)
    job = client.submit("echo conda-env=$CONDA_DEFAULT_ENV", conda_env="torch-2",
                        env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert job.wait(timeout_s=30) == "SUCCEEDED"
    assert "conda-env=torch-2" in job.logs()
