"""AWS Batch against a moto server on 127.0.0.1 (Batch without Docker, and S3). Moto runs
no containers, so each test runs the universal runner itself, with the environment a Batch
container would get, as a container would."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from adapters.aws_batch import AwsBatchAdapter
from adapters.aws_batch import _status as _aws_status
from app.client import Client
from app.core.states import JobState
from app.runtime import Runtime
from tests.support.servers import ROOT, until

pytestmark = pytest.mark.e2e
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


def _moto_server(fail: bool) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, **({"MOTO_SIMPLE_BATCH_FAIL_AFTER": "0"} if fail else {})}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)
    config = urllib.request.Request(f"{url}/moto-api/config", method="POST",
                                    data=json.dumps({"batch": {"use_docker": False}}).encode(),
                                    headers={"Content-Type": "application/json"})
    urllib.request.urlopen(config, timeout=5).close()
    return proc, url


def _provision(url: str) -> None:
    import boto3

    kw = {"endpoint_url": url, "region_name": "us-east-1",
          "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    role = boto3.client("iam", **kw).create_role(
        RoleName="gpuq-batch", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    batch = boto3.client("batch", **kw)
    env = batch.create_compute_environment(computeEnvironmentName="gpuq-ce", type="UNMANAGED",
                                           state="ENABLED", serviceRole=role)
    batch.create_job_queue(jobQueueName="gpuq-queue", state="ENABLED", priority=1,
                           computeEnvironmentOrder=[{
                               "order": 1, "computeEnvironment": env["computeEnvironmentArn"]}])
    batch.register_job_definition(jobDefinitionName="gpuq", type="container",
                                  containerProperties={
                                      "image": "gpuq", "vcpus": 1, "memory": 512,
                                      "command": ["python", "-m", "adapters.runner"]})
    boto3.client("s3", **kw).create_bucket(Bucket="gpuq-bucket")


@pytest.fixture(params=[False, True], ids=["moto-succeeds", "moto-fails"])
def aws(request, settings, monkeypatch) -> Iterator[tuple[AwsBatchAdapter, Client, str]]:
    proc, url = _moto_server(fail=request.param)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    try:
        _provision(url)
        aws_settings = settings.model_copy(update={
            "aws_batch_queue": "gpuq-queue", "aws_s3_bucket": "gpuq-bucket",
            "aws_endpoint_url": url})
        rt = Runtime(aws_settings)
        adapter = AwsBatchAdapter()
        adapter.rt = rt
        client = Client(aws_settings)
        yield adapter, client, "fails" if request.param else "succeeds"
        client.close()
        rt.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _run_containers(adapter: AwsBatchAdapter, backend_ids: list[str]) -> list[int]:
    """What Batch would do: start each job's container, i.e. its runner, with its env."""
    codes = []
    for job in adapter.batch.describe_jobs(jobs=backend_ids)["jobs"]:
        env = {e["name"]: e["value"] for e in job["container"]["environment"]}
        env.update(_resolved_secrets(adapter, job))
        if ":" in job["jobId"]:
            env["AWS_BATCH_JOB_ARRAY_INDEX"] = job["jobId"].rsplit(":", 1)[1]
        env.update(CREDENTIALS, AWS_ENDPOINT_URL=adapter.rt.settings.aws_endpoint_url or "",
                   PYTHONPATH=str(ROOT), PATH=os.environ["PATH"])
        codes.append(subprocess.run([sys.executable, "-m", "adapters.runner"], env=env,
                                    timeout=60).returncode)
    return codes


def _resolved_secrets(adapter: AwsBatchAdapter, job: dict) -> dict[str, str]:
    """What ECS would add: each `secrets` entry of the job's definition, from Secrets Manager."""
    (definition,) = adapter.batch.describe_job_definitions(
        jobDefinitions=[job["jobDefinition"]])["jobDefinitions"]
    return {ref["name"]: adapter.secretsmanager.get_secret_value(
        SecretId=ref["valueFrom"])["SecretString"]
        for ref in definition["containerProperties"].get("secrets", [])}


def cube(x: int) -> int:
    return x**3


def test_function_launch_runs_as_an_array_and_routes_results(aws):
    adapter, client, mode = aws
    handle = client.map(cube, [1, 2, 3, 4], backend="aws_batch")
    adapter.sync()
    rows = sorted(client.rows(handle.job_ids), key=lambda r: r["rank"])
    backend_ids = [r["backend_id"] for r in rows]
    parent = backend_ids[0].split(":")[0]
    assert backend_ids == [f"{parent}:{i}" for i in range(4)], "one array job, rank = index"
    assert _run_containers(adapter, backend_ids) == [0, 0, 0, 0]
    adapter.sync()
    rows = client.rows(handle.job_ids)
    if mode == "succeeds":
        assert {r["status"] for r in rows} == {"SUCCEEDED"}
        assert [job.result(timeout_s=5) for job in handle.jobs] == [1, 8, 27, 64]
    else:  # moto's failure mode: Batch reports every job FAILED
        assert {r["status"] for r in rows} == {"FAILED"}


def test_large_payloads_travel_through_s3(aws):
    adapter, client, mode = aws
    adapter.inline_limit_bytes = 16
    job = client.submit(cube, 5, backend="aws_batch")
    adapter.sync()
    row = client.rows([job.id])[0]
    container_env = adapter.batch.describe_jobs(jobs=[row["backend_id"]])["jobs"][0][
        "container"]["environment"]
    names = {e["name"] for e in container_env}
    assert "GPUQ_PAYLOAD_URI" in names and "GPUQ_PAYLOAD" not in names
    _run_containers(adapter, [row["backend_id"]])
    adapter.sync()
    if mode == "succeeds":
        assert job.result(timeout_s=5) == 125


def test_cancel_terminates_the_batch_job(aws):
    adapter, client, _ = aws
    job = client.submit("sleep 600", backend="aws_batch")
    adapter.sync()
    assert job.cancel() == {"cancelled": [], "cancelling": [job.id]}
    adapter.sync()
    row = client.rows([job.id])[0]
    assert row["status"] == JobState.CANCELLED.value
    described = adapter.batch.describe_jobs(jobs=[row["backend_id"]])["jobs"][0]
    assert described["statusReason"] == "gpuq: cancelled by user"
    assert row["backend_id"] in client.call("logs", job_id=job.id)["where"]


def test_missing_queue_setting_names_the_fix(settings, local):
    adapter = AwsBatchAdapter()
    adapter.rt = Runtime(settings)
    job = local.submit("true", backend="aws_batch")
    assert adapter.sync()["submitted"] == 0
    adapter.rt.close()
    row = job.row()  # kept, to be submitted once the setting is there, and saying why not
    assert row["status"] == "PENDING"
    assert "not yet submitted to aws_batch: set GPUQ_AWS_" in row["reason"]


def test_a_submission_whose_record_was_lost_is_adopted_by_its_name(aws, monkeypatch):
    from tests.contract.test_adapters import _RecordLost, lose_the_record

    adapter, client, _ = aws
    handle = client.launch("true", num_jobs=3, backend="aws_batch")
    lose_the_record(monkeypatch)
    with pytest.raises(_RecordLost):
        adapter.sync()
    monkeypatch.undo()
    adapter.sync()
    rows = sorted(client.rows(handle.job_ids), key=lambda r: r["rank"])
    parent = rows[0]["backend_id"].split(":")[0]
    assert [r["backend_id"] for r in rows] == [f"{parent}:{i}" for i in range(3)]
    listed = adapter.batch.list_jobs(jobQueue="gpuq-queue", jobStatus="SUBMITTED")
    others = adapter.batch.list_jobs(jobQueue="gpuq-queue", jobStatus="RUNNABLE")
    assert len(listed["jobSummaryList"] + others["jobSummaryList"]) <= 1, "one array job"


def _decoded(obj: object) -> str:
    """An object as JSON, with every base64 value in it decoded beside it (the inline
    payload is base64)."""
    text = json.dumps(obj, default=str)
    for word in re.findall(r"[A-Za-z0-9+/=]{16,}", text):
        with contextlib.suppress(ValueError):
            text += "\n" + base64.b64decode(word, validate=True).decode("latin-1")
    return text


@pytest.mark.parametrize("inline_limit", [1 << 20, 16])
def test_a_secret_reaches_the_container_through_secrets_manager_only(aws, tmp_path,
                                                                     inline_limit):
    from botocore.exceptions import ClientError

    adapter, client, mode = aws
    adapter.inline_limit_bytes = inline_limit
    value = "aws-secret-" + tmp_path.name
    job = client.submit(f"echo $API_TOKEN > {tmp_path}/seen", backend="aws_batch",
                        secrets={"API_TOKEN": value})
    adapter.sync()
    backend_id = client.rows([job.id])[0]["backend_id"]
    described = adapter.batch.describe_jobs(jobs=[backend_id])["jobs"][0]
    definitions = adapter.batch.describe_job_definitions(
        jobDefinitions=[described["jobDefinition"]])["jobDefinitions"]
    assert value not in _decoded(described), "not in the job's environment nor its payload"
    assert value not in _decoded(definitions)
    objects = adapter.s3.list_objects_v2(Bucket="gpuq-bucket").get("Contents", [])
    stored = [adapter.s3.get_object(Bucket="gpuq-bucket", Key=o["Key"])["Body"].read()
              for o in objects]
    assert (len(stored) == 1) == (inline_limit == 16)
    assert not any(value.encode() in data for data in stored), "not in the S3 payload"
    (ref,) = definitions[0]["containerProperties"]["secrets"]
    assert ref["name"] == "API_TOKEN" and ref["valueFrom"].startswith("arn:aws:secretsmanager:")
    assert _run_containers(adapter, [backend_id]) == [0]
    assert (tmp_path / "seen").read_text() == f"{value}\n", "the job sees its secret"
    until(lambda: adapter.sync() is not None and job.done(), 30)
    assert job.status == ("SUCCEEDED" if mode == "succeeds" else "FAILED")
    with pytest.raises(ClientError):  # deleted once the job ended
        adapter.secretsmanager.get_secret_value(SecretId=ref["valueFrom"])


def test_a_jobs_time_limit_is_its_batch_timeout_and_a_timed_out_attempt_is_timeout(aws):
    adapter, client, _ = aws
    short = client.submit("sleep 300", backend="aws_batch", time="10s")
    long = client.submit("true", backend="aws_batch", time="2h")
    adapter.sync()
    timeouts = {job["jobId"]: job.get("timeout") for job in adapter.batch.describe_jobs(
        jobs=[short.row()["backend_id"], long.row()["backend_id"]])["jobs"]}
    # Batch takes no timeout under a minute: the shortest it has
    assert timeouts == {short.row()["backend_id"]: {"attemptDurationSeconds": 60},
                        long.row()["backend_id"]: {"attemptDurationSeconds": 7200}}
    # What Batch says of an attempt it stopped at its timeout is a time-out, not a failure
    ended = _aws_status({"status": "FAILED", "container": {"exitCode": 137},
                         "statusReason": "Job attempt duration exceeded timeout"})
    assert (ended.state, ended.exit_code) == ("timeout", 137)
    assert _aws_status({"status": "FAILED", "statusReason": "Essential container in task "
                        "exited"}).state == "failed"
