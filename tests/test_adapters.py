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
from tests.conftest import IN_CI, until
from tests.k8s_cluster import cluster_runtime

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
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    with contextlib.ExitStack() as stack:
        if request.param == "kubernetes":  # kmock and a controller running the pods
            _, rt = stack.enter_context(cluster_runtime(rt.settings))
        instance = adapter_classes()[request.param]()
        instance.rt = rt
        instance.vanished_grace_s = 0.5
        yield instance


def drive(adapter: BatchAdapter, client: Client, ids: Sequence[int], timeout_s: float = 60
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
