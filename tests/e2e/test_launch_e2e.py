"""Bulk launches and Python-function jobs through real workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.client import Client
from app.core import keys
from app.core.errors import PayloadTooLarge
from tests.support.servers import until

pytestmark = pytest.mark.e2e


def square_plus(x: int, offset: int = 0) -> int:
    return x * x + offset


def explode(message: str) -> None:
    raise ValueError(message)


def gpus_seen() -> str:
    return os.environ["CUDA_VISIBLE_DEVICES"]


def test_launch_ranks_are_exactly_zero_to_n_minus_one(client: Client, tmp_path: Path):
    out = tmp_path / "ranks"
    out.mkdir()
    handle = client.launch(["bash", "-c", f"echo $GPUQ_NUM_JOBS > {out}/{{rank}}"],
                           num_jobs=12, name="ranks")
    rows = handle.wait(timeout_s=120)
    assert {r["status"] for r in rows} == {"SUCCEEDED"}
    assert sorted(r["rank"] for r in rows) == list(range(12))
    assert sorted(int(p.name) for p in out.iterdir()) == list(range(12))
    assert {p.read_text().strip() for p in out.iterdir()} == {"12"}


def test_each_replica_gets_its_own_argument_set(client: Client):
    handle = client.launch("echo lr", rank_args=[["0.1"], ["0.01"], ["0.001"]])
    handle.wait(timeout_s=60)
    logs = [job.logs() for job in handle.jobs]
    assert [log.splitlines()[-1] for log in logs] == ["lr 0.1", "lr 0.01", "lr 0.001"]


def test_launch_cancelled_right_after_it_returns_leaves_none_running(client: Client):
    handle = client.launch("sleep 60", num_jobs=20)
    counts_at_return = handle.counts()
    # Every replica exists when the call returns; only free GPUs may have taken some.
    assert sum(counts_at_return.values()) == 20
    assert counts_at_return.get("PENDING", 0) >= 18
    assert set(counts_at_return) <= {"PENDING", "STARTING", "RUNNING"}
    handle.cancel()
    rows = handle.wait(timeout_s=60)
    assert {r["status"] for r in rows} == {"CANCELLED"}
    assert all(r["started_at"] is None or r["ended_at"] for r in rows)


def test_payload_is_deleted_when_the_launch_finishes(client: Client):
    handle = client.launch("true", rank_args=[["a"], ["b"], ["c"]])  # a stored payload
    key = _payload_key(client, handle.id)
    ttl = client.rt.redis.ttl(key)
    assert ttl > 13 * 86400, "the payload outlives any launch"
    handle.wait(timeout_s=60)
    until(lambda: not client.rt.redis.exists(key))


def _payload_key(client: Client, launch_id: int) -> str:
    from sqlmodel import Session

    from app.store.models import Launch

    with Session(client.rt.engine) as session:
        launch = session.get(Launch, launch_id)
        assert launch is not None and launch.payload_key
        return launch.payload_key


def test_function_job_returns_its_value(client: Client):
    job = client.submit(square_plus, 7, gpus=1)
    assert job.result(timeout_s=60) == 49
    assert job.row()["command"].startswith("python: tests.e2e.test_launch_e2e.square_plus")


def test_function_job_runs_on_its_gpu(client: Client):
    job = client.submit(gpus_seen)
    assert job.result(timeout_s=60) == ",".join(map(str, job.row()["gpu_ids"]))


def test_function_job_raises_the_remote_error_with_its_traceback(client: Client):
    job = client.submit(explode, "bad learning rate")
    with pytest.raises(ValueError, match="bad learning rate") as caught:
        job.result(timeout_s=60)
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "remote traceback" in notes and "in explode" in notes
    row = job.row()
    assert row["status"] == "FAILED" and "raised builtins.ValueError" in row["reason"]


def test_map_calls_the_function_once_per_item(client: Client):
    handle = client.map(square_plus, [1, 2, 3, 4])
    assert [job.result(timeout_s=60) for job in handle.jobs] == [1, 4, 9, 16]


def test_oversize_payload_is_refused_before_anything_is_queued(client: Client):
    before = client.call("queue")["total"]
    # Payloads of earlier tests' launches may still be there, or go meanwhile: none is added.
    payloads_before = set(client.rt.redis.keys("gpuq:payload:*"))
    small_limit = Client(client.settings.model_copy(update={"max_payload_bytes": 10_000}))
    try:
        with pytest.raises(PayloadTooLarge, match="GPUQ_MAX_PAYLOAD_BYTES"):
            small_limit.submit(square_plus, os.urandom(50_000))
    finally:
        small_limit.close()
    assert client.call("queue")["total"] == before
    assert set(client.rt.redis.keys("gpuq:payload:*")) <= payloads_before


def big_result() -> bytes:
    return os.urandom(3_000_000)


def test_oversize_result_fails_the_job_with_a_clear_reason(client: Client, stack_settings):
    assert stack_settings.max_result_bytes == 1_000_000
    job = client.submit(big_result)
    assert job.wait(timeout_s=60) == "FAILED"
    assert "over GPUQ_MAX_RESULT_BYTES (1,000,000)" in job.row()["reason"]
    assert client.rt.redis.get(keys.result(job.id)) is None


def rank_and_size(scale: int) -> tuple[int, int]:
    return int(os.environ["GPUQ_JOB_RANK"]) * scale, int(os.environ["GPUQ_NUM_JOBS"])


def test_launch_of_a_function_gives_every_replica_its_rank(client: Client):
    handle = client.launch(rank_and_size, 4, 10)
    assert sorted(job.result(timeout_s=60) for job in handle.jobs) == [
        (0, 4), (10, 4), (20, 4), (30, 4)]


def rank_from_job_environment(scale: int) -> tuple[int, int]:
    from app.client import JobEnvironment

    env = JobEnvironment.current()
    return env.rank * scale, env.num_jobs


def fail_on_rank(bad: int) -> int:
    from app.client import JobEnvironment

    rank = JobEnvironment.current().rank
    if rank >= bad:
        raise RuntimeError(f"replica {rank} gave up")
    return rank


def test_launch_results_are_the_values_in_rank_order(client: Client):
    handle = client.launch(rank_from_job_environment, 4, 10)
    assert len(handle) == 4
    assert [job.id for job in handle] == handle.job_ids
    assert handle.results(timeout_s=60) == [(0, 4), (10, 4), (20, 4), (30, 4)]


def test_map_results_are_the_values_in_item_order(client: Client):
    assert client.map(square_plus, [3, 1, 2]).results(timeout_s=60) == [9, 1, 4]


def test_launch_results_raise_the_lowest_ranked_failure_with_its_traceback(client: Client):
    handle = client.launch(fail_on_rank, 3, 1)
    with pytest.raises(RuntimeError, match="replica 1 gave up") as caught:
        handle.results(timeout_s=60)
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "remote traceback" in notes and "in fail_on_rank" in notes
    assert [row["status"] for row in sorted(handle.wait(), key=lambda r: r["rank"])] == [
        "SUCCEEDED", "FAILED", "FAILED"]
