"""Time limits on real workers: a job past its limit gets its warning signal at the asked
time, then ends TIMEOUT with nothing of it left, is never restarted, and `gpuq wait` calls
it a failure."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from app.client import Client
from app.core.procgroup import group_exists
from app.core.settings import Settings
from tests.support.servers import ROOT, server_env, until

pytestmark = pytest.mark.e2e
GPUQ = str(Path(sys.executable).parent / "gpuq")


@pytest.fixture(scope="module")
def stack_settings(stack_settings: Settings) -> Settings:
    # A short kill wait: a job that ignores SIGTERM at its limit is killed soon after.
    return stack_settings.model_copy(update={"kill_wait_s": 2.0})


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _alive(pid: int) -> bool:
    """A process that runs (a killed one whose adopter has not reaped it is a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_a_job_past_its_limit_is_warned_then_ends_timeout_with_nothing_left(
        client: Client, tmp_path: Path, stack_settings: Settings):
    signalled, daemon = tmp_path / "signalled", tmp_path / "daemon.pid"
    warned = tmp_path / "daemon-terminated"
    # Given a job of 3 s that wants SIGUSR2 2 s before its limit, writes when it gets it,
    # leaves a daemon in a session of its own (which notes a SIGTERM and runs on),
    # ignores SIGTERM and sleeps on; it may restart twice
    daemon_script = (f"echo $$ > {daemon}; trap \"touch {warned}\" TERM; "
                     "while :; do sleep 0.1; done")
    # (the daemon starts first: a signal ignored when bash starts cannot be trapped)
    script = (f"setsid -f bash -c '{daemon_script}' >/dev/null 2>&1; "
              f"trap 'date +%s.%N >> {signalled}' USR2; trap '' TERM; "
              "echo started; while :; do sleep 1000 & wait $!; done")
    job = client.submit(["bash", "-c", script], time="3s", signal="USR2@2", max_restarts=2,
                        name="over-time")
    until(lambda: "started" in job.logs() and job.status == "RUNNING", timeout_s=60)
    running = client.call("job", job_id=job.id)
    pgid = running["pid"]
    assert running["time_limit_s"] == 3 and running["signal"] == "USR2@2"
    # When it runs past its limit
    assert job.wait(timeout_s=90) == "TIMEOUT"
    # Then it got the signal once, 1 s after its recorded start (2 s before its limit)
    row = client.call("job", job_id=job.id)
    arrivals = [float(line) for line in signalled.read_text().split()]
    assert len(arrivals) == 1, arrivals
    assert abs(arrivals[0] - (_epoch(row["started_at"]) + 1)) <= 1.0, (arrivals, row)
    # And nothing of it is left: neither its process group nor the daemon of its container,
    # which had its SIGTERM too
    assert not group_exists(pgid)
    assert daemon.exists() and not _alive(int(daemon.read_text()))
    assert warned.exists()
    # And it was not restarted, however many restarts it had
    assert row["restart_count"] == 0 and row["reason"] == "reached its time limit of 3s"
    events = [e["to"] for e in row["events"]]
    assert events == ["PENDING", "STARTING", "RUNNING", "TIMEOUT"]
    # And `gpuq wait` calls it a failure
    waited = subprocess.run([GPUQ, "wait", str(job.id)],
                            env=server_env(stack_settings, PYTHONPATH=str(ROOT),
                                           GPUQ_TRANSPORT="local"),
                            capture_output=True, text=True, timeout=120)
    assert waited.returncode != 0, waited.stdout + waited.stderr
    assert "TIMEOUT" in waited.stdout + waited.stderr


def test_a_job_within_its_limit_succeeds_and_sees_its_deadline(client: Client):
    job = client.submit(["bash", "-c", "echo deadline=$GPUQ_JOB_DEADLINE"], time="1h")
    assert job.wait(timeout_s=60) == "SUCCEEDED"
    row = client.call("job", job_id=job.id)
    deadline = int(job.logs().split("deadline=")[1].split()[0])
    # read as the attempt started: never after the limit counted from the recorded start
    assert deadline <= _epoch(row["started_at"]) + 3600
    assert deadline >= _epoch(row["started_at"]) + 3600 - 60


def test_a_limit_set_on_a_running_job_reaches_its_worker(client: Client):
    # Given a job without a limit, running
    job = client.submit(["bash", "-c", "echo started; exec sleep 300"], name="no-limit")
    until(lambda: "started" in job.logs() and job.status == "RUNNING", timeout_s=60)
    # When its owner gives it a limit of 2 s
    assert job.set_time("2s")["updated"] == [job.id]
    # Then its worker stops it at that limit, counted from its start
    assert job.wait(timeout_s=60) == "TIMEOUT"
    assert client.call("job", job_id=job.id)["reason"] == "reached its time limit of 2s"
