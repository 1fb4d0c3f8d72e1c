"""The batch adapter contract, run against every adapter (real Redis, real database, real
runner processes). Each test drives the adapter's sync pass as beat would."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sqlmodel import col, update

from adapters.base import BatchAdapter, Status
from app.client import Client
from app.core.backends import adapter_classes
from app.core.procgroup import group_exists
from app.core.states import JobState
from app.runtime import Runtime
from app.store.models import Job
from tests.support.k8s_cluster import cluster_runtime
from tests.support.servers import missing, until

pytestmark = pytest.mark.e2e


def slurm_missing() -> str | None:
    """Why the single-node Slurm of deploy/slurm/ cannot be used here, if it cannot."""
    if not shutil.which("sbatch"):
        return "no Slurm here: run deploy/slurm/setup.sh as root"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, check=False)
    if "UP" not in ping.stdout:
        return f"Slurm is installed but its controller is not up: {ping.stdout.strip()}"
    return None


# The contract suite drives real processes; AWS Batch is tested against moto on its own.
@pytest.fixture(params=["process", "slurm", "kubernetes"])
def adapter(request: pytest.FixtureRequest, rt: Runtime) -> Iterator[BatchAdapter]:
    if request.param == "slurm" and (why := slurm_missing()):
        missing(why)
    with contextlib.ExitStack() as stack:
        if request.param == "kubernetes":  # kmock and a controller running the pods
            _, rt = stack.enter_context(cluster_runtime(rt.settings))
        instance = adapter_classes()[request.param]()
        instance.rt = rt
        instance.vanished_grace_s = 0.5
        yield instance


def drive(adapter: BatchAdapter, client: Client, ids: Sequence[int], timeout_s: float = 120
          ) -> list[dict]:
    """Sync until every job has ended; return their rows."""
    deadline = time.monotonic() + timeout_s
    while True:
        adapter.sync()
        rows = client.rows(ids)
        if all(JobState(r["status"]).terminal for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"still running: {rows}")
        time.sleep(0.1)


def square(x: int) -> int:
    return x * x


def fail(message: str) -> None:
    raise RuntimeError(message)


def test_command_jobs_succeed_or_fail_with_their_exit_code(adapter, local):
    ok = local.submit("echo hello from $GPUQ_JOB_RANK", backend=adapter.backend_name)
    bad = local.submit("exit 9", backend=adapter.backend_name)
    rows = {r["id"]: r for r in drive(adapter, local, [ok.id, bad.id])}
    assert (rows[ok.id]["status"], rows[ok.id]["exit_code"]) == ("SUCCEEDED", 0)
    assert (rows[bad.id]["status"], rows[bad.id]["exit_code"]) == ("FAILED", 9)
    assert rows[ok.id]["backend"] == adapter.backend_name and rows[ok.id]["backend_id"]
    if adapter.backend_name == "kubernetes":  # output stays with the pod
        assert "kubectl logs" in local.call("logs", job_id=ok.id)["where"]
    else:
        assert "hello from 0" in ok.logs()


def test_a_launch_runs_every_rank_once(adapter, local, tmp_path: Path):
    out = tmp_path / "ranks"
    out.mkdir()
    handle = local.launch(f"echo $GPUQ_NUM_JOBS > {out}/{{rank}}", num_jobs=5,
                          backend=adapter.backend_name)
    rows = drive(adapter, local, handle.job_ids)
    assert {r["status"] for r in rows} == {"SUCCEEDED"}
    assert sorted(int(p.name) for p in out.iterdir()) == [0, 1, 2, 3, 4]
    assert {p.read_text().strip() for p in out.iterdir()} == {"5"}


def test_function_results_and_remote_errors_are_routed_to_the_job(adapter, local):
    ok = local.submit(square, 12, backend=adapter.backend_name)
    bad = local.submit(fail, "no such checkpoint", backend=adapter.backend_name)
    drive(adapter, local, [ok.id, bad.id])
    assert ok.result(timeout_s=5) == 144
    with pytest.raises(RuntimeError, match="no such checkpoint"):
        bad.result(timeout_s=5)
    assert "raised builtins.RuntimeError" in bad.row()["reason"]


@pytest.mark.parametrize("inline_limit", [1 << 20, 64])
def test_payloads_on_both_sides_of_the_inline_threshold(adapter, local, inline_limit):
    adapter.inline_limit_bytes = inline_limit
    handle = local.map(square, [1, 2, 3], backend=adapter.backend_name)
    drive(adapter, local, handle.job_ids)
    assert [job.result(timeout_s=5) for job in handle.jobs] == [1, 4, 9]
    stored = list((adapter.store_dir(adapter.rt.settings) / "payloads").glob("*"))
    if adapter.backend_name == "kubernetes":  # a ConfigMap the pods mount
        stored = adapter.core.list_namespaced_config_map("default").items
    assert bool(stored) is (inline_limit == 64), "large payloads go to the backend's store"


def test_cancel_reaches_a_running_batch_job(adapter, local):
    job = local.submit("echo started; sleep 300", backend=adapter.backend_name)
    until(lambda: adapter.sync() and job.status == "RUNNING")
    assert job.cancel() == {"cancelled": [], "cancelling": [job.id]}
    rows = drive(adapter, local, [job.id])
    assert rows[0]["status"] == "CANCELLED"


def test_concurrency_limit_holds_the_rest_pending(adapter, local):
    adapter.max_concurrent_jobs = 2
    handle = local.launch("sleep 1", num_jobs=5, backend=adapter.backend_name)
    adapter.sync()
    counts = handle.counts()
    assert counts.get("PENDING") == 3 and sum(counts.values()) == 5
    rows = drive(adapter, local, handle.job_ids)
    assert {r["status"] for r in rows} == {"SUCCEEDED"}


def _events(client: Client, job_id: int) -> list[str]:
    return [e["to"] for e in client.call("job", job_id=job_id)["events"]]


def test_a_failed_replica_restarts_alone_until_it_succeeds(adapter, local, tmp_path: Path):
    # Given a launch whose rank 1 fails on its first two attempts, with two restarts allowed
    out = tmp_path / "attempts"
    out.mkdir()
    handle = local.launch(f"echo $GPUQ_RESTART_COUNT >> {out}/{{rank}}; "
                          f"[ {{rank}} != 1 ] || [ $GPUQ_RESTART_COUNT -ge 2 ]",
                          num_jobs=3, max_restarts=2, backend=adapter.backend_name)
    # When the backend runs it
    rows = {r["rank"]: r for r in drive(adapter, local, handle.job_ids, timeout_s=120)}
    # Then every rank succeeded; rank 1 after two restarts, each a job of its own
    assert {r["status"] for r in rows.values()} == {"SUCCEEDED"}
    assert [rows[rank]["restart_count"] for rank in range(3)] == [0, 2, 0]
    assert {rank: (out / str(rank)).read_text().split() for rank in range(3)} == {
        0: ["0"], 1: ["0", "1", "2"], 2: ["0"]}, "only the failed replica runs again"
    assert _events(local, rows[1]["id"]).count("RECOVERING") == 2
    if adapter.backend_name == "slurm":  # resubmitted as a plain job, not an array task
        assert "_" not in rows[1]["backend_id"] and "_" in rows[0]["backend_id"]


def test_a_job_that_always_fails_ends_failed_after_every_restart(adapter, local):
    job = local.submit("exit 7", max_restarts=2, backend=adapter.backend_name)
    rows = drive(adapter, local, [job.id], timeout_s=120)
    assert (rows[0]["status"], rows[0]["exit_code"], rows[0]["restart_count"]) == (
        "FAILED", 7, 2)
    events = _events(local, job.id)
    assert events.count("STARTING") == 3, "one attempt and two restarts"
    assert events.count("RECOVERING") == 2


def fails_on_first_attempt(x: int) -> int:
    if os.environ["GPUQ_RESTART_COUNT"] == "0":
        raise RuntimeError("first attempt fails")
    return x * x


def test_a_restarted_function_job_returns_its_last_attempts_result(adapter, local):
    job = local.submit(fails_on_first_attempt, 7, max_restarts=1, backend=adapter.backend_name)
    rows = drive(adapter, local, [job.id], timeout_s=120)
    assert (rows[0]["status"], rows[0]["restart_count"]) == ("SUCCEEDED", 1)
    assert job.result(timeout_s=5) == 49
    reasons = [e["reason"] for e in local.call("job", job_id=job.id)["events"]]
    assert "raised builtins.RuntimeError: first attempt fails; restarting" in reasons


def test_a_late_status_of_a_restarted_jobs_old_backend_job_changes_nothing(adapter, local):
    # Given a job that failed once and restarted
    job = local.submit("exit 3", max_restarts=1, backend=adapter.backend_name)
    adapter.sync()
    with adapter.rt.session() as session:
        first = session.get(Job, job.id)
        assert first is not None and first.backend_id and first.attempt == 1
        session.expunge(first)
    until(lambda: adapter.sync() is not None and job.row()["restart_count"] == 1, 60)
    # When a pass that read the first attempt applies its old backend job's end late
    moved = adapter._apply(first, Status("failed", "late", 3))
    # Then the second attempt is untouched, and ends by its own backend job
    assert moved == 0
    assert job.row()["restart_count"] == 1 and job.row()["backend_id"] != first.backend_id
    rows = drive(adapter, local, [job.id], timeout_s=120)
    assert (rows[0]["status"], rows[0]["restart_count"]) == ("FAILED", 1)
    assert _events(local, job.id).count("RECOVERING") == 1


def test_a_job_the_backend_forgot_restarts_while_restarts_remain(adapter, local):
    job = local.submit("sleep 300", max_restarts=1, backend=adapter.backend_name)
    until(lambda: adapter.sync() and job.status == "RUNNING")
    first = job.row()["backend_id"]
    _vanish(adapter, first)
    until(lambda: adapter.sync() is not None and job.row()["restart_count"] == 1, 30)
    assert job.row()["backend_id"] != first
    until(lambda: adapter.sync() is not None and job.status == "RUNNING", 60)
    assert job.cancel()["cancelling"] == [job.id]
    rows = drive(adapter, local, [job.id])
    assert rows[0]["status"] == "CANCELLED"
    assert any(e["to"] == "RECOVERING" and "no longer knows" in e["reason"]
               for e in local.call("job", job_id=job.id)["events"])


def test_a_job_the_backend_forgot_becomes_lost_after_the_grace(adapter, local):
    job = local.submit("sleep 300", backend=adapter.backend_name)
    until(lambda: adapter.sync() and job.status == "RUNNING")
    _vanish(adapter, job.row()["backend_id"])
    rows = drive(adapter, local, [job.id], timeout_s=30)
    assert rows[0]["status"] == "LOST"
    assert "no longer knows" in rows[0]["reason"]


def _vanish(adapter: BatchAdapter, backend_id: str) -> None:
    """Make the backend lose the job, the way each backend can."""
    if adapter.backend_name == "process":
        pgid = int(Path(f"{backend_id}.pgid").read_text())
        os.killpg(pgid, 9)
        until(lambda: not group_exists(pgid))
        Path(f"{backend_id}.exit").unlink(missing_ok=True)
    elif adapter.backend_name == "kubernetes":
        namespace, name, _ = backend_id.split("/")
        adapter.batch.delete_namespaced_job(name, namespace)
    elif adapter.backend_name == "slurm":
        # Slurm forgets a job MinJobAge after it ends: stand in a job id it never issued.
        adapter.cancel([backend_id])
        with adapter.rt.session() as session:
            session.execute(update(Job).where(col(Job.backend_id) == backend_id)
                            .values(backend_id="999999999"))
            session.commit()


class StuckAdapter(adapter_classes()["process"]):  # type: ignore[misc, valid-type]
    """A backend that accepts jobs and never schedules them."""

    def poll(self, backend_ids: Sequence[str]) -> dict[str, Status]:
        return {i: Status("pending", "Resources: no node has 8 free GPUs") for i in backend_ids}


def test_a_job_stuck_pending_fails_with_the_backends_reason(rt, local):
    adapter = StuckAdapter()
    adapter.rt = rt
    adapter.pending_timeout_s = 0.5
    job = local.submit("sleep 300", backend="process")
    adapter.sync()
    time.sleep(0.6)
    rows = drive(adapter, local, [job.id])
    assert rows[0]["status"] == "FAILED"
    assert "no node has 8 free GPUs" in rows[0]["reason"]


class _RecordLost(Exception):
    """Stands in for a sync that died between the backend call and its record."""


def lose_the_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next sync submits and then dies before it records the backend ids."""
    from adapters import intent

    def die(*args: object, **kwargs: object) -> list[str]:
        raise _RecordLost

    monkeypatch.setattr(intent, "record", die)


def test_a_submission_whose_record_was_lost_is_adopted_by_its_tag(adapter, local, tmp_path,
                                                                  monkeypatch):
    # Given a launch whose sync submitted it and died before recording its backend ids
    out = tmp_path / "runs"
    out.mkdir()
    handle = local.launch(f"echo ran >> {out}/{{rank}}", num_jobs=3,
                          backend=adapter.backend_name)
    lose_the_record(monkeypatch)
    with pytest.raises(_RecordLost):
        adapter.sync()
    monkeypatch.undo()
    rows = local.rows(handle.job_ids)
    assert "STARTING" in {r["status"] for r in rows} and not any(r["backend_id"] for r in rows)
    # When later syncs run, they find what was submitted by its tag and adopt it
    rows = drive(adapter, local, handle.job_ids)
    # Then nothing was submitted twice: every rank ran once
    assert {r["status"] for r in rows} == {"SUCCEEDED"}
    assert all(r["backend_id"] for r in rows)
    assert sorted((out / str(rank)).read_text().split().count("ran") for rank in range(3)) == [
        1, 1, 1]


def test_a_secret_reaches_the_job_or_the_job_waits_saying_why(adapter, local, tmp_path):
    seen = tmp_path / "seen"
    job = local.submit(f"echo $API_TOKEN > {seen}", backend=adapter.backend_name,
                       secrets={"API_TOKEN": "contract-s3cret"})
    if not adapter.carries_secrets:  # never handed over in plain
        adapter.sync()
        row = local.rows([job.id])[0]
        assert row["status"] == "PENDING" and "cannot pass a job's secrets" in row["reason"]
        local.call("cancel", ids=[job.id])
        return
    assert drive(adapter, local, [job.id])[0]["status"] == "SUCCEEDED"
    assert seen.read_text() == "contract-s3cret\n"
