"""Slurm: what the contract suite does not cover, on the single-node cluster of
deploy/slurm/ (GPUs, arrays split at MaxArraySize, a refused submission), and the parsing of
scontrol's answers."""

from __future__ import annotations

import base64
import logging
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.runner import take_secrets_file
from adapters.slurm import POLL_FIELDS, TAG_FIELDS, SlurmAdapter, _status, records, safe_name
from app.runtime import Runtime
from tests.contract.test_adapters import drive, slurm_missing
from tests.support.servers import missing, until


@pytest.fixture
def slurm(rt: Runtime) -> Iterator[SlurmAdapter]:
    if why := slurm_missing():
        missing(why)
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
    job = local.submit("true", backend="slurm", secrets={"API_TOKEN": SECRET})
    assert slurm.sync()["submitted"] == 0
    row = job.row()
    assert row["status"] == "PENDING"
    assert "invalid partition" in row["reason"].lower(), row["reason"]
    # and the secrets file written for it is gone with the refusal
    assert slurm.secrets_dir().is_dir() and not list(slurm.secrets_dir().iterdir())


SECRET = "s3cr3t-for-slurm-only"
# What the runner itself gives a job: its place in the launch and where its payload and
# result are. Nothing else named GPUQ_* reaches a job.
RUNNER_VARIABLES = {"GPUQ_JOB_RANK", "GPUQ_JOB_ID", "GPUQ_NUM_JOBS", "GPUQ_RANK_OFFSET",
                    "GPUQ_RESTART_COUNT", "GPUQ_LAUNCH_ID", "GPUQ_PAYLOAD", "GPUQ_PAYLOAD_FILE",
                    "GPUQ_RESULT_DIR"}


def _slurm_text(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@pytest.mark.e2e
def test_a_secret_reaches_the_slurm_job_and_nothing_slurm_keeps(slurm, local, tmp_path: Path,
                                                                monkeypatch):
    # Given a control worker whose environment holds what no job may see
    monkeypatch.setenv("GPUQ_SECRET", "the-workers-own-secret")
    monkeypatch.setenv("GPUQ_DATABASE_URL_FOR_TEST", "postgresql://gpuq:db-password@db/gpuq")
    out = tmp_path / "out"
    out.mkdir()
    # When a job is given a secret and runs on Slurm
    job = local.submit(f"env -0 > {out}/env; touch {out}/started; sleep 600", backend="slurm",
                       secrets={"API_TOKEN": SECRET})
    until(lambda: slurm.sync() is not None and (out / "started").exists(), timeout_s=120)
    backend_id = job.row()["backend_id"]
    # Then the job sees its secret and none of the worker's variables
    seen = dict(v.split("=", 1) for v in (out / "env").read_text().split("\0") if "=" in v)
    assert seen["API_TOKEN"] == SECRET
    assert {k for k in seen if k.startswith("GPUQ_")} <= RUNNER_VARIABLES, sorted(seen)
    assert "db-password" not in "".join(seen.values())
    if "GPUQ_PAYLOAD" in seen:  # the inline payload (also in the script) carries no secret
        assert SECRET.encode() not in base64.b64decode(seen["GPUQ_PAYLOAD"])
    # and what Slurm keeps of the job (its details, its script, its stored environment)
    # holds neither the secret nor the worker's variables
    kept = [_slurm_text("scontrol", "show", "job", "-dd", backend_id),
            _slurm_text("scontrol", "write", "batch_script", backend_id, "-")]
    state_dir = Path(slurm.config["StateSaveLocation"])
    stored = list(state_dir.glob(f"hash.*/job.{backend_id}/environment"))
    assert stored, f"no stored environment of job {backend_id} under {state_dir}"
    kept += [p.read_bytes().decode(errors="replace") for p in stored]
    if slurm.config.get("AccountingStorageType", "").endswith("slurmdbd"):
        kept.append(_slurm_text("sacct", "--env-vars", "-j", backend_id))
    for text in kept:
        assert SECRET not in text
        assert "the-workers-own-secret" not in text and "db-password" not in text
    assert "exec /usr/bin/env" in kept[1], "the script shown is the one gpuq wrote"
    # and the private file that carried the secret is gone once the job started
    assert not list(slurm.secrets_dir().iterdir())
    for path in slurm.store_dir(slurm.rt.settings).rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path
    job.cancel()
    assert drive(slurm, local, [job.id])[0]["status"] == "CANCELLED"


def test_each_replica_gets_a_secrets_file_only_its_owner_reads(rt):
    adapter = SlurmAdapter()
    adapter.rt = rt
    paths = adapter._secret_files("gpuq-0a1b2c3d-5-1-2", 2, {"API_TOKEN": SECRET, "B": "x"})
    assert [p.name for p in paths] == ["gpuq-0a1b2c3d-5-1-2.0", "gpuq-0a1b2c3d-5-1-2.1"]
    assert stat.S_IMODE(adapter.secrets_dir().stat().st_mode) == 0o700
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes() == f"API_TOKEN={SECRET}\0B=x".encode()
    assert adapter._secret_files("gpuq-0a1b2c3d-6-1-1", 1, {}) == []


def test_the_runner_takes_its_secrets_file_and_deletes_it(tmp_path: Path):
    secrets_file = tmp_path / "s"
    secrets_file.write_bytes(b"API_TOKEN=a=b\nc\0OTHER=x")
    env = {"GPUQ_SECRETS_FILE": str(secrets_file)}
    try:
        take_secrets_file(env)
        assert (os.environ["API_TOKEN"], os.environ["OTHER"]) == ("a=b\nc", "x")
        assert not secrets_file.exists() and "GPUQ_SECRETS_FILE" not in env
        with pytest.raises(SystemExit, match=r"secrets file .* is gone"):
            take_secrets_file({"GPUQ_SECRETS_FILE": str(secrets_file)})
    finally:
        os.environ.pop("API_TOKEN", None)
        os.environ.pop("OTHER", None)


END = "@0123456789abcdef@"


def test_squeue_records_keep_free_text_in_its_own_field():
    text = (f"7|2|PENDING|0|Resources|gpuq-a-1-1-4{END}\n"
            f"12|N/A|FAILED|2304|NonZeroExitCode|a name|with JobState=COMPLETED{END}\n"
            f"13|N/A|RUNNING|0|None|two\nlines 14|N/A|FAILED|0|None|x{END}\n")
    assert records(text, END, POLL_FIELDS) == [
        ["7", "2", "PENDING", "0", "Resources", "gpuq-a-1-1-4"],
        ["12", "N/A", "FAILED", "2304", "NonZeroExitCode", "a name|with JobState=COMPLETED"],
        ["13", "N/A", "RUNNING", "0", "None", "two\nlines 14|N/A|FAILED|0|None|x"]]


def test_malformed_squeue_records_are_skipped_and_logged(caplog):
    text = (f"JobId=9 JobState=COMPLETED{END}\n"          # not squeue's fields at all
            f"9|N/A|completed|0|None|x{END}\n"            # a state Slurm never writes
            f"9|N/A|RUNNING|-1|None|x{END}\n"             # an exit status that is no number
            f"9|N/A{END}\n"                               # too few fields
            f"10|N/A|RUNNING|0|None|kept{END}\n"
            f"11|N/A|RUNNING|0|None|no end")                # cut short: no end token
    # (whatever level an earlier test left on the loggers above it)
    with caplog.at_level(logging.WARNING, logger="adapters.slurm"):
        kept = records(text, END, POLL_FIELDS)
    assert kept == [["10", "N/A", "RUNNING", "0", "None", "kept"]]
    assert len([r for r in caplog.records if "does not parse" in r.getMessage()]) == 4
    assert records(f"5|3|gpuq-alice|gpuq-x{END}\n", END, TAG_FIELDS) == [
        ["5", "3", "gpuq-alice", "gpuq-x"]]


@pytest.mark.parametrize(("name", "expected"), [
    ("gpuq-0a1b2c3d-17-1-4", "gpuq-0a1b2c3d-17-1-4"),
    ("train\nJobState=FAILED", "train_JobState_FAILED"),
    ("a b=c\x1b[2J", "a_b_c_2J"),
    ("", "gpuq"),
    ("x" * 500, "x" * 128),
])
def test_job_names_and_comments_are_made_safe_for_slurm(name, expected):
    assert safe_name(name) == expected


@pytest.mark.parametrize(("state", "reason", "exit_code", "expected"), [
    ("PENDING", "Resources", "0:0", ("pending", "PENDING: Resources", None)),
    ("RUNNING", "None", "0:0", ("running", None, None)),
    ("COMPLETING", "None", "0:0", ("running", None, None)),
    ("COMPLETED", "None", "0:0", ("succeeded", None, 0)),
    ("FAILED", "NonZeroExitCode", "9:0", ("failed", "FAILED on Slurm: NonZeroExitCode", 9)),
    ("TIMEOUT", "TimeLimit", "0:15", ("timeout", "reached its time limit (TIMEOUT on Slurm)",
                                      143)),
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


@pytest.mark.e2e
@pytest.mark.timeout(300)  # (a minute's limit and Slurm's own pace, not the machine's)
def test_a_job_past_its_limit_is_stopped_by_slurm_and_ends_timeout(slurm, local):
    # Slurm counts limits in whole minutes and looks at them about every 30 s: the
    # shortest limit it has, reached within about a minute and a half.
    over = local.submit("sleep 600", backend="slurm", time="1m", max_restarts=2)
    rows = drive(slurm, local, [over.id], timeout_s=240)
    limit = subprocess.run(["scontrol", "show", "job", rows[0]["backend_id"]],
                           capture_output=True, text=True).stdout
    assert rows[0]["status"] == "TIMEOUT", rows[0]
    assert rows[0]["restart_count"] == 0, "a time-out is never restarted"
    assert "TimeLimit=00:01:00" in limit, limit
