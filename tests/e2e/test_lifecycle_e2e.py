"""A job's whole life through real worker processes, real Redis and a real database."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import pytest

from app.client import Client
from app.core.procgroup import group_exists
from tests.support.servers import until

pytestmark = pytest.mark.e2e


def test_successful_job_records_exit_code_times_and_output(client: Client, stack_settings):
    job = client.submit(["bash", "-c", "echo out-$GPUQ_JOB_ID; echo err >&2"], name="hello")
    assert job.wait(timeout_s=30) == "SUCCEEDED"
    row = job.row()
    assert row["exit_code"] == 0 and row["host"] == stack_settings.hostname
    assert len(row["gpu_ids"]) == 1
    assert row["started_at"] and row["ended_at"] and row["duration_s"] >= 0
    assert f"out-{job.id}" in job.logs() and "err" in job.logs()


def test_failing_job_ends_failed_with_its_exit_code(client: Client):
    job = client.submit("exit 7")
    assert job.wait(timeout_s=30) == "FAILED"
    assert job.row()["exit_code"] == 7


def test_job_sees_its_rank_world_size_and_gpus(client: Client, tmp_path: Path,
                                               stack_settings):
    out = tmp_path / "env"
    out.mkdir()
    handle = client.launch(
        ["bash", "-c", f"env | grep -E '^(GPUQ|CUDA)_' | sort > {out}/$GPUQ_JOB_RANK"],
        num_jobs=3, env={"MY_VAR": "mine"})
    assert {r["status"] for r in handle.wait(timeout_s=60)} == {"SUCCEEDED"}
    for rank, job_id in enumerate(handle.job_ids):
        env = dict(line.split("=", 1) for line in (out / str(rank)).read_text().splitlines())
        row = client.rows([job_id])[0]
        assert env["GPUQ_JOB_ID"] == str(job_id)
        assert env["GPUQ_JOB_RANK"] == str(rank)
        assert env["GPUQ_NUM_JOBS"] == "3"
        assert env["GPUQ_LAUNCH_ID"] == str(handle.id)
        assert env["GPUQ_RESTART_COUNT"] == "0"
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, row["gpu_ids"]))
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert env["GPUQ_HOST"] == stack_settings.hostname
        assert "GPUQ_REDIS_URL" not in env, "the worker's settings stay out of the job"


def test_user_env_and_workdir_reach_the_job(client: Client, tmp_path: Path):
    job = client.submit("echo $MY_VAR in $(pwd)", env={"MY_VAR": "mine"}, workdir=str(tmp_path))
    assert job.wait(timeout_s=30) == "SUCCEEDED"
    assert f"mine in {tmp_path}" in job.logs()


def test_cancelled_pending_job_never_starts(client: Client, tmp_path: Path):
    blockers = [client.submit(f"sleep 30 # {n}") for n in range(2)]
    until(lambda: all(b.status == "RUNNING" for b in blockers))
    marker = tmp_path / "ran"
    waiting = client.submit(f"touch {marker}")
    assert waiting.status == "PENDING"
    assert waiting.cancel() == {"cancelled": [waiting.id], "cancelling": []}
    for b in blockers:
        b.cancel()
    until(lambda: all(b.done() for b in blockers))
    follower = client.submit("true")  # the GPUs went round again after the blockers
    assert follower.wait(timeout_s=30) == "SUCCEEDED"
    assert waiting.status == "CANCELLED"
    assert not marker.exists()


def test_cancelled_running_job_loses_its_whole_process_group(client: Client):
    # The child ignores SIGTERM, so only the SIGKILL after the grace period ends it.
    job = client.submit(["bash", "-c", "trap '' TERM; sleep 300 & echo started; wait"])
    # The log can show output before the worker has recorded the pid and RUNNING.
    until(lambda: "started" in job.logs() and job.status == "RUNNING")
    pgid = client.call("job", job_id=job.id)["pid"]
    assert group_exists(pgid)
    assert job.cancel() == {"cancelled": [], "cancelling": [job.id]}
    assert job.wait(timeout_s=30) == "CANCELLED"
    assert not group_exists(pgid)
    events = [e["to"] for e in client.call("job", job_id=job.id)["events"]]
    assert events == ["PENDING", "STARTING", "RUNNING", "CANCELLING", "CANCELLED"]


def test_failed_attempt_is_restarted_within_its_budget(client: Client):
    job = client.submit("echo attempt $GPUQ_RESTART_COUNT; exit 3", max_restarts=2)
    assert job.wait(timeout_s=60) == "FAILED"
    row = job.row()
    assert row["restart_count"] == 2 and row["exit_code"] == 3
    assert [line for line in job.logs().splitlines() if line.startswith("attempt")] == [
        "attempt 0", "attempt 1", "attempt 2"]


def test_job_longer_than_the_visibility_timeout_runs_once(client: Client, tmp_path: Path,
                                                          stack_settings):
    assert stack_settings.visibility_timeout_s == 2
    runs = tmp_path / "runs"
    job = client.submit(f"echo run >> {runs}; sleep 5")
    assert job.wait(timeout_s=60) == "SUCCEEDED"
    time.sleep(2.5)  # a redelivery would have happened by now
    assert runs.read_text().split() == ["run"]
    assert client.call("job", job_id=job.id)["events"][-1]["to"] == "SUCCEEDED"


def test_two_jobs_never_hold_one_gpu(client: Client, tmp_path: Path):
    spans = tmp_path / "spans"
    spans.mkdir()
    script = (f"s=$(date +%s.%N); sleep 0.3; e=$(date +%s.%N); "
              f"echo $CUDA_VISIBLE_DEVICES $s $e > {spans}/$GPUQ_JOB_RANK")
    handle = client.launch(["bash", "-c", script], num_jobs=8)
    assert {r["status"] for r in handle.wait(timeout_s=120)} == {"SUCCEEDED"}
    by_gpu: dict[str, list[tuple[float, float]]] = {}
    for path in spans.iterdir():
        gpu, start, end = path.read_text().split()
        by_gpu.setdefault(gpu, []).append((float(start), float(end)))
    assert sum(len(v) for v in by_gpu.values()) == 8
    for gpu, intervals in by_gpu.items():
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert start >= end, f"GPU {gpu} ran two jobs at once"


def test_local_and_remote_operations_agree(client: Client, remote_client: Client,
                                           stack_settings):
    job = remote_client.submit("echo remote-hello")
    assert remote_client.job(job.id).wait(timeout_s=30) == "SUCCEEDED"
    for op, kwargs in [("queue", {"limit": 5}), ("job", {"job_id": job.id}),
                       ("logs", {"job_id": job.id}), ("launches", {})]:
        local, remote = client.call(op, **kwargs), remote_client.call(op, **kwargs)
        if op in ("queue", "job"):
            _drop_live_durations(local, remote)
        assert local == remote, op
    assert "remote-hello" in remote_client.job(job.id).logs()
    status_local, status_remote = client.call("status"), remote_client.call("status")
    assert status_local["counts"] == status_remote["counts"]
    assert [h["host"] for h in status_local["hosts"]] == [stack_settings.hostname]


def _drop_live_durations(*answers: dict) -> None:
    """A running job's duration grows between two calls; everything else must match."""
    for answer in answers:
        for row in answer.get("jobs", [answer]):
            if row["ended_at"] is None:
                row["duration_s"] = None


def test_remote_errors_keep_their_type(remote_client: Client):
    from app.core.errors import JobNotFound

    with pytest.raises(JobNotFound, match="no job with id 424242"):
        remote_client.call("logs", job_id=424242)


def _gpu_worker_pid(host: str, index: int) -> int:
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"-n gpu{index}@{host}" in cmdline and "celery" in cmdline:
            return int(proc.name)
    raise AssertionError(f"no worker for GPU {index} of {host}")


@pytest.mark.parametrize(("max_restarts", "final"), [(1, "RUNNING"), (0, "LOST")])
def test_sigkilled_worker_job_is_restarted_or_lost_and_its_gpu_freed(client: Client,
                                                                     stack_settings,
                                                                     max_restarts, final):
    job = client.submit(f"sleep 300 # restarts {max_restarts}", max_restarts=max_restarts)
    until(lambda: job.status == "RUNNING")
    first = client.call("job", job_id=job.id)
    os.kill(_gpu_worker_pid(stack_settings.hostname, first["gpu_ids"][0]), 9)
    # The supervisor starts the worker again; it stops the orphaned job and settles it.
    until(lambda: not group_exists(first["pid"]), timeout_s=60)
    row = until(lambda: (r := job.row())["status"] == final and
                 (final == "LOST" or r["restart_count"] == 1) and r, timeout_s=60)
    states = [e["to"] for e in client.call("job", job_id=job.id)["events"]]
    if final == "LOST":
        assert states[-1] == "LOST" and row["exit_code"] is None
    else:
        assert "RECOVERING" in states
        job.cancel()
        assert job.wait(timeout_s=30) == "CANCELLED"
    follower = client.submit(f"echo after the crash {max_restarts}")
    assert follower.wait(timeout_s=60) == "SUCCEEDED", "the GPUs are usable again"


@pytest.mark.parametrize("tmux", [False, True], ids=["direct", "tmux"])
def test_a_daemon_a_job_left_is_gone_before_the_next_job_on_its_gpu_starts(
        client: Client, tmp_path: Path, tmux: bool):
    pidfile = tmp_path / "daemon.pid"
    # Given a job on GPU 0 that starts a daemon in a session of its own and ends (the
    # daemon lets go of the job's output, which a tmux job's end waits for)
    first = client.submit(["bash", "-c", f"setsid -f bash -c 'echo $$ > {pidfile}; exec sleep "
                           f"300' >/dev/null 2>&1; until [ -s {pidfile} ]; do sleep 0.01; "
                           "done"], allowed_gpu_ids=[0], name="leaves-a-daemon", tmux=tmux)
    # When the next job on that GPU starts
    # (a killed daemon whose adopter does not reap it stays a zombie: dead, not running)
    state = f"$(sed 's/.*) //' /proc/$(cat {pidfile})/stat 2>/dev/null | cut -d' ' -f1)"
    second = client.submit(["bash", "-c", f"s={state}; if [ -z \"$s\" ] || [ \"$s\" = Z ]; "
                            "then echo daemon-gone; else echo daemon-alive; fi"],
                           allowed_gpu_ids=[0], after=[first.id], name="next-on-gpu-0")
    # Then the daemon was gone before it started
    assert second.wait(timeout_s=60) == "SUCCEEDED", second.logs()
    assert first.row()["status"] == "SUCCEEDED"
    assert first.row()["gpu_ids"] == second.row()["gpu_ids"] == [0]
    assert "daemon-gone" in second.logs(), second.logs()


def test_an_attempts_cpu_time_is_read_from_its_cgroup_into_its_record(client: Client):
    job = client.submit(["python3", "-c", "sum(range(5_000_000))"], name="burns-cpu")
    assert job.wait(timeout_s=60) == "SUCCEEDED"
    # The figures are written just after the outcome
    attempt = until(lambda: next(iter(a for a in job.info().attempts
                                      if a.cpu_s is not None), None), timeout_s=30)
    assert attempt.cpu_s > 0.05, attempt
