"""AWS Batch: jobs and array jobs through boto3; large payloads and results in S3.

A job's secrets are stored in Secrets Manager, one secret per variable, and reach the
container through the `secrets` of a job definition registered for that submission (a copy
of GPUQ_AWS_BATCH_JOB_DEFINITION, named by the submission's tag): the job's description
and its definition carry only their ARNs, never a value. Its execution role must be allowed
`secretsmanager:GetSecretValue`. When the job (an array: its parent) has ended, its secrets
are deleted and its definition deregistered.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from adapters.base import BatchAdapter, Status, Submission, SubmitRefused
from app.core.errors import GpuqError
from app.core.settings import Settings
from app.store.models import Job

log = logging.getLogger(__name__)
MAX_ARRAY = 10_000  # AWS Batch array sizes are 2..10,000
DESCRIBE_CHUNK = 100  # describe_jobs takes at most 100 ids
ENDED = {"SUCCEEDED", "FAILED"}
# What a submission's definition copies of the configured one.
DEFINITION_FIELDS = ("type", "parameters", "containerProperties", "retryStrategy", "timeout",
                     "platformCapabilities", "propagateTags")
CANCEL_REASON = "gpuq: cancelled by user"
# What Batch says of an attempt it stopped at its timeout; the shortest timeout it takes.
TIMEOUT_REASON = "Job attempt duration exceeded timeout"
MIN_TIMEOUT_S = 60
WAITING = {"SUBMITTED", "PENDING", "RUNNABLE", "STARTING"}


class AwsBatchAdapter(BatchAdapter):
    backend_name = "aws_batch"
    name = "gpuq.batch.aws_batch"
    carries_secrets = True

    def _client(self, service: str) -> Any:
        import boto3

        settings = self.rt.settings
        return boto3.client(service, region_name=settings.aws_region,
                            endpoint_url=settings.aws_endpoint_url)

    @cached_property
    def batch(self) -> Any:
        return self._client("batch")

    @cached_property
    def s3(self) -> Any:
        return self._client("s3")

    @cached_property
    def secretsmanager(self) -> Any:
        return self._client("secretsmanager")

    def _bucket(self) -> str:
        if not self.rt.settings.aws_s3_bucket:
            raise GpuqError("set GPUQ_AWS_S3_BUCKET: aws_batch keeps large payloads and "
                            "results there")
        return self.rt.settings.aws_s3_bucket

    def _queue(self) -> str:
        if not self.rt.settings.aws_batch_queue:
            raise GpuqError("set GPUQ_AWS_BATCH_QUEUE to the Batch job queue to submit to")
        return self.rt.settings.aws_batch_queue

    @classmethod
    def output(cls, settings: Settings, job: Job) -> tuple[Path | None, str | None]:
        return None, (f"CloudWatch Logs, group /aws/batch/job, stream of AWS Batch job "
                      f"{job.backend_id or '(not submitted yet)'}")

    def _result_prefix(self, job: Job) -> str:
        return f"gpuq/results/{job.launch_id or f'j{job.id}'}"

    def result_env(self, job: Job) -> dict[str, str]:
        return {"GPUQ_RESULT_URI": f"s3://{self._bucket()}/{self._result_prefix(job)}"}

    def payload_env(self, key: str, data: bytes, job: Job) -> dict[str, str]:
        object_key = f"gpuq/payloads/{key.replace(':', '_')}"
        self.s3.put_object(Bucket=self._bucket(), Key=object_key, Body=data)
        return {"GPUQ_PAYLOAD_URI": f"s3://{self._bucket()}/{object_key}"}

    def read_result(self, job: Job) -> bytes | None:
        try:
            answer = self.s3.get_object(Bucket=self._bucket(),
                                        Key=f"{self._result_prefix(job)}/{job.rank}.pkl")
        except self.s3.exceptions.NoSuchKey:
            return None
        data: bytes = answer["Body"].read()
        return data

    def forget_result(self, job: Job) -> None:
        self.s3.delete_object(Bucket=self._bucket(),
                              Key=f"{self._result_prefix(job)}/{job.rank}.pkl")

    def array_limit(self) -> int:
        return MAX_ARRAY

    def submit(self, submission: Submission) -> str:
        """One job, or an array of up to 10,000 replicas (a larger launch comes in parts,
        each told its first rank through GPUQ_RANK_OFFSET), named by the tag."""
        from botocore.exceptions import ClientError

        overrides: dict[str, Any] = {}
        if submission.gpus:
            overrides["resourceRequirements"] = [{"type": "GPU", "value": str(submission.gpus)}]
        part = submission.jobs
        env = {**submission.env, "GPUQ_RANK_OFFSET": str(part[0].rank)}
        if len(part) == 1:
            env.update(GPUQ_JOB_RANK=str(part[0].rank), GPUQ_JOB_ID=str(part[0].id))
        request: dict[str, Any] = {
            "jobName": submission.tag, "jobQueue": self._queue(),
            "jobDefinition": self.rt.settings.aws_batch_job_definition,
            "tags": {"gpuq/name": submission.name[:256]},
            "containerOverrides": {
                **overrides,
                "environment": [{"name": k, "value": v} for k, v in env.items()]},
        }
        if len(part) > 1:
            request["arrayProperties"] = {"size": len(part)}
        if part[0].time_limit_s:  # each attempt's; Batch takes no less than a minute
            request["timeout"] = {"attemptDurationSeconds": max(MIN_TIMEOUT_S,
                                                                part[0].time_limit_s)}
        if submission.secrets:
            request["jobDefinition"] = self._definition_with_secrets(submission)
        try:
            return str(self.batch.submit_job(**request)["jobId"])
        except ClientError as e:  # an answer: the request was refused, nothing was made
            if submission.secrets:
                self._drop_definition(request["jobDefinition"])
            raise SubmitRefused(f"AWS Batch refused the job: {e}") from e

    def _definition_with_secrets(self, submission: Submission) -> str:
        """Store the secrets in Secrets Manager; register the configured job definition
        again, under the submission's tag, with `secrets` naming them; return its ARN."""
        from botocore.exceptions import ClientError

        base = self.rt.settings.aws_batch_job_definition
        try:
            found = self.batch.describe_job_definitions(
                **({"jobDefinitions": [base]} if ":" in base else
                   {"jobDefinitionName": base, "status": "ACTIVE"}))["jobDefinitions"]
        except ClientError as e:
            raise SubmitRefused(f"AWS Batch: job definition {base!r}: {e}") from e
        if not found:
            raise SubmitRefused(f"no AWS Batch job definition {base!r}: register it, or set "
                                "GPUQ_AWS_BATCH_JOB_DEFINITION")
        definition = max(found, key=lambda d: d.get("revision", 0))
        refs = []
        for i, (variable, value) in enumerate(sorted(submission.secrets.items())):
            arn = self.secretsmanager.create_secret(
                Name=f"{submission.tag}/{i}", SecretString=value,
                Tags=[{"Key": "gpuq/install", "Value": self.install}])["ARN"]
            refs.append({"name": variable, "valueFrom": arn})
        fields = {k: definition[k] for k in DEFINITION_FIELDS if k in definition}
        fields["containerProperties"] = {**fields.get("containerProperties", {}),
                                         "secrets": refs}
        return str(self.batch.register_job_definition(
            jobDefinitionName=submission.tag, **fields)["jobDefinitionArn"])

    def _drop_definition(self, arn: str) -> None:
        """Delete the secrets a submission's definition names, and deregister it."""
        from botocore.exceptions import ClientError

        try:
            found = self.batch.describe_job_definitions(jobDefinitions=[arn])["jobDefinitions"]
            for definition in found:
                for ref in definition.get("containerProperties", {}).get("secrets", []):
                    with contextlib.suppress(ClientError):
                        self.secretsmanager.delete_secret(SecretId=ref["valueFrom"],
                                                          ForceDeleteWithoutRecovery=True)
            self.batch.deregister_job_definition(jobDefinition=arn)
        except ClientError as e:  # tried again when the job is polled next
            log.warning("aws_batch: secrets of %s not deleted yet: %s", arn, e)

    def member_ids(self, handle: str, count: int) -> list[str]:
        return [handle] if count == 1 else [f"{handle}:{index}" for index in range(count)]

    def tagged(self) -> dict[str, str]:
        """This installation's jobs in the queue, by name (every state)."""
        found: dict[str, str] = {}
        pages = self.batch.get_paginator("list_jobs").paginate(
            jobQueue=self._queue(),
            filters=[{"name": "JOB_NAME", "values": [f"gpuq-{self.install}-*"]}])
        for page in pages:
            for job in page["jobSummaryList"]:  # an array's children name it: parent:i
                found[job["jobName"]] = job["jobId"].split(":")[0]
        return found

    def poll(self, backend_ids: Sequence[str]) -> dict[str, Status]:
        """describe_jobs for the ids, and for the parents of array children: a job (an
        array: its parent) that has ended gives its secrets up."""
        parents = sorted({i.split(":")[0] for i in backend_ids if ":" in i} - set(backend_ids))
        asked = [*backend_ids, *parents]
        statuses: dict[str, Status] = {}
        for start in range(0, len(asked), DESCRIBE_CHUNK):
            answer = self.batch.describe_jobs(jobs=asked[start:start + DESCRIBE_CHUNK])
            for job in answer["jobs"]:
                statuses[job["jobId"]] = _status(job)
                if job["status"] in ENDED and ":" not in job["jobId"] and _own_definition(job):
                    self._drop_definition(job["jobDefinition"])
        return {i: statuses[i] for i in backend_ids if i in statuses}

    def cancel(self, backend_ids: Sequence[str]) -> None:
        for backend_id in backend_ids:
            self.batch.terminate_job(jobId=backend_id, reason=CANCEL_REASON)


def _own_definition(job: dict[str, Any]) -> bool:
    """Whether a job runs under the definition registered for its secrets (named by its
    tag, the job's name) and not yet deregistered."""
    name = str(job.get("jobDefinition", "")).rsplit("/", 1)[-1].rsplit(":", 1)[0]
    return name == job.get("jobName")


def _status(job: dict[str, Any]) -> Status:
    state, reason = job["status"], job.get("statusReason")
    exit_code = (job.get("container") or {}).get("exitCode")
    if state in WAITING:
        return Status("pending", f"{state}: {reason}" if reason else state)
    if state == "RUNNING":
        return Status("running")
    if reason == CANCEL_REASON:
        return Status("cancelled", reason, exit_code)
    if state == "SUCCEEDED":
        return Status("succeeded", None, exit_code or 0)
    if reason and reason.startswith(TIMEOUT_REASON):
        return Status("timeout", f"reached its time limit ({reason} on AWS Batch)", exit_code)
    return Status("failed", reason or "failed on AWS Batch", exit_code)
