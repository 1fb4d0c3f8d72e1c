"""Slurm: what the contract suite does not cover, on the single-node cluster of
deploy/slurm/ (GPUs, arrays split at MaxArraySize, a refused submission), and the parsing of
scontrol's answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.slurm import SlurmAdapter, _ids, _records, _status
from app.runtime import Runtime
from tests.conftest import IN_CI
from tests.test_adapters import drive, slurm_missing


@pytest.fixture
def slurm(rt: Runtime) -> Iterator[SlurmAdapter]:
    if why := slurm_missing():
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    adapter = SlurmAdapter()
    adapter.rt = rt
    yield adapter
    live = [r["backend_id"] for r in rt_rows(rt) if r["backend_id"] and r["status"] in
            ("STARTING", "RUNNING", "CANCELLING")]
    if live:
        adapter.cancel(live)


def rt_rows(rt: Runtime) -> list[dict]:
    from app.ops.registry import call_local

    return call_local(rt, "queue", {"limit": 1000})["jobs"]  # type: ignore[no-any-return]


@pytest.mark.e2e
def test_gpu_jobs_get_their_gpus_from_slurm(slurm, local):
    job = local.submit("echo gpus=$CUDA_VISIBLE_DEVICES", gpus=2, backend="slurm")
    rows = drive(slurm, local, [job.id])
    assert rows[0]["status"] == "SUCCEEDED"
    visible = job.logs().split("gpus=")[1].split()[0]
    assert len(visible.split(",")) == 2, job.logs()


@pytest.mark.e2e
def test_a_launch_over_max_array_size_is_split_and_keeps_every_rank(slurm, local,
                                                                   tmp_path: Path):
    slurm.config["MaxArraySize"] = "3"
    out = tmp_path / "ranks"
    out.mkdir()
    handle = local.launch(f"touch {out}/$GPUQ_JOB_RANK", num_jobs=7, backend="slurm")
    rows = drive(slurm, local, handle.job_ids)
    assert {r["status"] for r in rows} == {"SUCCEEDED"}
    assert sorted(int(p.name) for p in out.iterdir()) == list(range(7))
    arrays = {r["backend_id"].split("_")[0] for r in rows if "_" in r["backend_id"]}
    singles = [r for r in rows if "_" not in r["backend_id"]]
    assert len(arrays) == 2 and len(singles) == 1, "7 replicas: arrays of 3 and 3, then one"


@pytest.mark.e2e
def test_a_refused_submission_leaves_the_job_pending_with_the_reason(slurm, local):
    slurm.rt.settings.slurm_partition = "no-such-partition"
    job = local.submit("true", backend="slurm")
    assert slurm.sync()["submitted"] == 0
    row = job.row()
    assert row["status"] == "PENDING"
    assert "invalid partition" in row["reason"].lower(), row["reason"]


def test_scontrol_records_and_array_ranges():
    text = ("JobId=7 ArrayJobId=7 ArrayTaskId=2-4,9 JobState=PENDING Reason=Resources "
            "ExitCode=0:0 Command=(null)\n"
            "JobId=12 JobName=wrap JobState=FAILED Reason=NonZeroExitCode ExitCode=9:0\n"
            "JobId=8 ArrayJobId=7 ArrayTaskId=0 JobState=RUNNING Reason=None ExitCode=0:0\n"
            "JobId=20 ArrayJobId=20 ArrayTaskId=0-6:3%2 JobState=PENDING "
            "Reason=JobArrayTaskLimit\n")
    records = _records(text)
    assert [_ids(r) for r in records] == [["7_2", "7_3", "7_4", "7_9"], ["12"], ["7_0"],
                                          ["20_0", "20_3", "20_6"]]
    assert records[1]["Reason"] == "NonZeroExitCode"


@pytest.mark.parametrize(("state", "reason", "exit_code", "expected"), [
    ("PENDING", "Resources", "0:0", ("pending", "PENDING: Resources", None)),
    ("RUNNING", "None", "0:0", ("running", None, None)),
    ("COMPLETING", "None", "0:0", ("running", None, None)),
    ("COMPLETED", "None", "0:0", ("succeeded", None, 0)),
    ("FAILED", "NonZeroExitCode", "9:0", ("failed", "FAILED on Slurm: NonZeroExitCode", 9)),
    ("TIMEOUT", "TimeLimit", "0:15", ("failed", "TIMEOUT on Slurm: TimeLimit", 143)),
    ("OUT_OF_MEMORY", "None", "0:125", ("failed", "OUT_OF_MEMORY on Slurm", 253)),
    ("CANCELLED", "None", "0:15", ("cancelled", "cancelled on Slurm", 143)),
])
def test_slurm_states_map_onto_the_contract(state, reason, exit_code, expected):
    status = _status(state, reason, exit_code)
    assert (status.state, status.reason, status.exit_code) == expected


def test_without_sbatch_the_error_names_the_fix(rt, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    adapter = SlurmAdapter()
    adapter.rt = rt
    with pytest.raises(Exception, match=r"Slurm login node.*deploy/slurm/setup\.sh"):
        adapter.poll(["1"])
