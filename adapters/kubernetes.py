"""Kubernetes: a launch is one Indexed batch/v1 Job, each replica one completion index.

A replica's backend id is `<namespace>/<job name>/<index>`; the runner's rank is
JOB_COMPLETION_INDEX plus GPUQ_RANK_OFFSET. Each index runs once (`backoffLimitPerIndex:
0`, so the Job's overall `backoffLimit` defaults to the maximum): gpuq, not Kubernetes,
decides on retries. Polling is one Job list and one Pod list per namespace, by label.

Payloads above the inline limit go in a ConfigMap (binaryData, at most 1 MiB) mounted
read-only into the pods and owned by the Job, so that it is collected with it. Results
go to GPUQ_RESULT_DIR in gpuq's store directory, which GPUQ_K8S_STORE_CLAIM (a ReadWriteMany
claim) mounts into every pod at the same path; a function job whose runner cannot write
there ends without a result.

A job's secrets go in a Secret of their own, owned by the Job like the ConfigMap, and
reach the container through `secretKeyRef`: never in the Job's spec, the payload or a
ConfigMap.

Cancelling every live index of a Job deletes the Job (foreground, with its pods).
Cancelling only some deletes those indexes' pods: with a per-index backoff of 0 the Job
marks them failed rather than running them again (clusters older than 1.28 may rerun
them). Cancelled ids are remembered for a week so that poll reports them cancelled, not
missing.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import secrets
from collections import defaultdict
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from adapters.base import BatchAdapter, Status, Submission, SubmitRefused
from app.core import keys
from app.core.errors import GpuqError, PayloadTooLarge
from app.core.settings import Settings
from app.store.models import Job

MANAGED = "app.kubernetes.io/managed-by"
SELECTOR = f"{MANAGED}=gpuq"
JOB_NAME, INDEX = "batch.kubernetes.io/job-name", "batch.kubernetes.io/job-completion-index"
PAYLOAD_CONFIGMAP = "GPUQ_PAYLOAD_CONFIGMAP"
PAYLOAD_MOUNT = "/var/run/gpuq/payload"
CONFIGMAP_MAX_BYTES = 1024 * 1024 - 4096  # a ConfigMap holds 1 MiB; leave room for metadata
FINISHED_TTL_S = 24 * 3600  # long past the slowest poll, so ended Jobs are read first
CANCELLED_TTL_S = 7 * 24 * 3600
# A pod's status reason when the kubelet stopped it at its activeDeadlineSeconds.
DEADLINE_EXCEEDED = "DeadlineExceeded"
MAX_COMPLETIONS = 100_000  # Indexed Jobs allow up to 10^5 completions
INSTALL_LABEL, TAG_LABEL = "gpuq/install", "gpuq/tag"  # found again by tagged()


class KubernetesAdapter(BatchAdapter):
    backend_name = "kubernetes"
    name = "gpuq.batch.kubernetes"
    carries_secrets = True

    @cached_property
    def api(self) -> Any:
        return _api_client(self.rt.settings)

    @cached_property
    def batch(self) -> Any:
        from kubernetes import client

        return client.BatchV1Api(self.api)

    @cached_property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api)

    @classmethod
    def output(cls, settings: Settings, job: Job) -> tuple[Path | None, str | None]:
        if not job.backend_id:
            return None, "the pod's log, once the Job is created"
        namespace, name, index = job.backend_id.split("/")
        return None, (f"the pod's log: kubectl logs -n {namespace} "
                      f"-l {JOB_NAME}={name},{INDEX}={index}")

    def payload_env(self, key: str, data: bytes, job: Job) -> dict[str, str]:
        if len(data) > CONFIGMAP_MAX_BYTES:
            raise PayloadTooLarge(f"payload is {len(data):,} bytes, over the "
                                  f"{CONFIGMAP_MAX_BYTES:,} a Kubernetes ConfigMap holds; pass "
                                  "large inputs by path or URL rather than by value")
        name = _unique_name(f"gpuq-payload-{key}")
        self.core.create_namespaced_config_map(self.rt.settings.k8s_namespace, {
            "metadata": {"name": name, "labels": {MANAGED: "gpuq"}},
            "binaryData": {"payload": base64.b64encode(data).decode()}})
        return {"GPUQ_PAYLOAD_FILE": f"{PAYLOAD_MOUNT}/payload", PAYLOAD_CONFIGMAP: name}

    def array_limit(self) -> int:
        return MAX_COMPLETIONS

    def submit(self, submission: Submission) -> str:
        """One Indexed Job for the part (a whole launch, normally), labelled with the tag;
        its secrets in a Secret of its own, which the Job owns."""
        from kubernetes.client.exceptions import ApiException

        namespace = self.rt.settings.k8s_namespace
        part = submission.jobs
        env = {**submission.env, "GPUQ_RANK_OFFSET": str(part[0].rank)}
        if len(part) == 1:
            env.update(GPUQ_JOB_RANK=str(part[0].rank), GPUQ_JOB_ID=str(part[0].id))
        name = _unique_name(submission.name)
        secret = self._create_secret(name, namespace, submission.secrets)
        body = self._job_body(name, len(part), submission, env, secret)
        try:
            created = _json(self.batch.create_namespaced_job(namespace, body,
                                                             _preload_content=False))
        except ApiException as e:
            # A 4xx other than a time-out or throttling is a refusal; the rest may have
            # created it.
            if e.status is not None and 400 <= e.status < 500 and e.status not in (408, 429):
                self._drop_secret(secret, namespace)
                raise SubmitRefused(f"Kubernetes refused the Job: {e.reason}") from e
            raise
        meta = created["metadata"]
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                 "uid": meta.get("uid", "")}
        if PAYLOAD_CONFIGMAP in submission.env:
            self._own_payload(submission.env[PAYLOAD_CONFIGMAP], namespace, owner)
        if secret is not None:  # collected with the Job
            self.core.patch_namespaced_secret(secret["name"], namespace,
                                              {"metadata": {"ownerReferences": [owner]}})
        return f"{namespace}/{meta['name']}"

    def _own_payload(self, configmap: str, namespace: str, owner: dict[str, str]) -> None:
        """Add a Job to the owners of the payload's ConfigMap (every part's Job mounts it)."""
        current = _json(self.core.read_namespaced_config_map(configmap, namespace,
                                                             _preload_content=False))
        owners = [*current["metadata"].get("ownerReferences", []), owner]
        self.core.patch_namespaced_config_map(configmap, namespace,
                                              {"metadata": {"ownerReferences": owners}})

    def _create_secret(self, job_name: str, namespace: str, values: dict[str, str]
                       ) -> dict[str, Any] | None:
        """A Secret holding the job's secret variables (keys v0, v1...: any variable name
        is allowed, a Secret's keys are not); None when it has none."""
        if not values:
            return None
        name = _unique_name(f"{job_name}-secrets")
        keyed = {f"v{i}": (variable, value) for i, (variable, value)
                 in enumerate(sorted(values.items()))}
        self.core.create_namespaced_secret(namespace, {
            "metadata": {"name": name, "labels": {MANAGED: "gpuq"}}, "type": "Opaque",
            "data": {key: base64.b64encode(value.encode()).decode()
                     for key, (_, value) in keyed.items()}})
        return {"name": name, "refs": [
            {"name": variable, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}
            for key, (variable, _) in keyed.items()]}

    def _drop_secret(self, secret: dict[str, Any] | None, namespace: str) -> None:
        from kubernetes.client.exceptions import ApiException

        if secret is not None:
            with contextlib.suppress(ApiException):
                self.core.delete_namespaced_secret(secret["name"], namespace)

    def member_ids(self, handle: str, count: int) -> list[str]:
        return [f"{handle}/{index}" for index in range(count)]

    def tagged(self) -> dict[str, str]:
        namespace = self.rt.settings.k8s_namespace
        listed = _json(self.batch.list_namespaced_job(
            namespace, label_selector=f"{SELECTOR},{INSTALL_LABEL}={self.install}",
            _preload_content=False))["items"]
        return {j["metadata"]["labels"][TAG_LABEL]: f"{namespace}/{j['metadata']['name']}"
                for j in listed if TAG_LABEL in j["metadata"].get("labels", {})}

    def _job_body(self, name: str, replicas: int, submission: Submission,
                  env: dict[str, str], secret: dict[str, Any] | None) -> dict[str, Any]:
        first = submission.jobs[0]
        labels = {MANAGED: "gpuq", INSTALL_LABEL: self.install, TAG_LABEL: submission.tag,
                  **({"gpuq/launch": str(first.launch_id)} if first.launch_id else
                     {"gpuq/job": str(first.id)})}
        container: dict[str, Any] = {
            "name": "job", "image": self.rt.settings.k8s_image,
            "command": ["python", "-m", "adapters.runner"],
            "env": [{"name": k, "value": v} for k, v in env.items()]
            + (secret["refs"] if secret else [])}
        pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
        if first.time_limit_s:  # counted from the pod's start, as gpuq counts from RUNNING
            pod["activeDeadlineSeconds"] = first.time_limit_s
        if submission.gpus:
            container["resources"] = {"limits": {"nvidia.com/gpu": str(submission.gpus)}}
        if submission.workdir:
            container["workingDir"] = submission.workdir
        volumes: list[dict[str, Any]] = []
        mounts: list[dict[str, Any]] = []
        if PAYLOAD_CONFIGMAP in env:
            volumes.append({"name": "payload", "configMap": {"name": env[PAYLOAD_CONFIGMAP]}})
            mounts.append({"name": "payload", "mountPath": PAYLOAD_MOUNT, "readOnly": True})
        if claim := self.rt.settings.k8s_store_claim:
            volumes.append({"name": "gpuq-store", "persistentVolumeClaim": {"claimName": claim}})
            mounts.append({"name": "gpuq-store",
                           "mountPath": str(self.store_dir(self.rt.settings))})
        if volumes:
            pod["volumes"], container["volumeMounts"] = volumes, mounts
        return {
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "labels": labels,
                         "annotations": {"gpuq/name": submission.name}},
            "spec": {"completionMode": "Indexed", "completions": replicas,
                     "parallelism": replicas, "backoffLimitPerIndex": 0,
                     "ttlSecondsAfterFinished": FINISHED_TTL_S,
                     "template": {"metadata": {"labels": labels}, "spec": pod}}}

    def poll(self, backend_ids: Sequence[str]) -> dict[str, Status]:
        cancelled = self._cancelled(backend_ids)
        by_namespace: dict[str, list[str]] = defaultdict(list)
        for backend_id in backend_ids:
            by_namespace[backend_id.split("/")[0]].append(backend_id)
        statuses: dict[str, Status] = {}
        for namespace, ids in by_namespace.items():
            listed = self.batch.list_namespaced_job(namespace, label_selector=SELECTOR,
                                                    _preload_content=False)
            jobs = {j["metadata"]["name"]: j for j in _json(listed)["items"]}
            pods = self._pods(namespace)
            for backend_id in ids:
                _, name, index = backend_id.split("/")
                pod = pods.get((name, index))
                if backend_id in cancelled:
                    statuses[backend_id] = Status("cancelled", "cancelled by user",
                                                  _exit_code(pod))
                elif name in jobs:
                    statuses[backend_id] = _index_status(jobs[name], int(index), pod)
        return statuses

    def _pods(self, namespace: str) -> dict[tuple[str, str], dict[str, Any]]:
        """Each index's newest pod."""
        listed = _json(self.core.list_namespaced_pod(namespace, label_selector=SELECTOR,
                                                     _preload_content=False))["items"]
        pods = {}
        for pod in sorted(listed, key=lambda p: p["metadata"].get("creationTimestamp", "")):
            meta = pod["metadata"]
            index = meta.get("labels", {}).get(INDEX) or meta.get("annotations", {}).get(INDEX)
            pods[(meta.get("labels", {}).get(JOB_NAME, ""), str(index))] = pod
        return pods

    def cancel(self, backend_ids: Sequence[str]) -> None:
        from kubernetes.client.exceptions import ApiException

        with self.rt.redis.pipeline() as pipe:
            for backend_id in backend_ids:
                pipe.set(keys.batch_cancelled("kubernetes", backend_id), 1, ex=CANCELLED_TTL_S)
            pipe.execute()
        by_job: dict[tuple[str, str], set[int]] = defaultdict(set)
        for backend_id in backend_ids:
            namespace, name, index = backend_id.split("/")
            by_job[(namespace, name)].add(int(index))
        for (namespace, name), indexes in by_job.items():
            try:
                job = _json(self.batch.read_namespaced_job(name, namespace,
                                                           _preload_content=False))
                if self._every_live_index_cancelled(namespace, job):
                    self.batch.delete_namespaced_job(name, namespace,
                                                     propagation_policy="Foreground")
                    continue
                for (job_name, index), pod in self._pods(namespace).items():
                    if job_name == name and int(index) in indexes:
                        self.core.delete_namespaced_pod(pod["metadata"]["name"], namespace)
            except ApiException as e:
                if e.status != 404:  # a Job or pod already gone needs no cancelling
                    raise

    def _every_live_index_cancelled(self, namespace: str, job: dict[str, Any]) -> bool:
        status, name = job.get("status", {}), job["metadata"]["name"]
        ids = [f"{namespace}/{name}/{i}" for i in range(job["spec"]["completions"])]
        ended = _indexes(status.get("completedIndexes")) | _indexes(status.get("failedIndexes"))
        return set(ids) - self._cancelled(ids) <= {ids[i] for i in ended}

    def _cancelled(self, backend_ids: Sequence[str]) -> set[str]:
        if not backend_ids:
            return set()
        marks = self.rt.redis.mget([keys.batch_cancelled("kubernetes", i) for i in backend_ids])
        return {i for i, mark in zip(backend_ids, marks, strict=True) if mark}


def _api_client(settings: Any) -> Any:
    """GPUQ_K8S_API_URL, else the in-cluster service account, else the kubeconfig."""
    from kubernetes import client, config

    if settings.k8s_api_url:
        configuration = client.Configuration()
        configuration.host = settings.k8s_api_url
        return client.ApiClient(configuration)
    if not settings.k8s_context:
        try:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        except config.ConfigException:
            pass
    try:
        return config.new_client_from_config(context=settings.k8s_context)
    except config.ConfigException as e:
        raise GpuqError("no Kubernetes cluster configured: set GPUQ_K8S_API_URL, run gpuq "
                        "in a pod, or provide a kubeconfig (KUBECONFIG or ~/.kube/config; "
                        f"GPUQ_K8S_CONTEXT picks its context): {e}") from e


def _index_status(job: dict[str, Any], index: int, pod: dict[str, Any] | None) -> Status:
    status = job.get("status", {})
    code = _exit_code(pod)
    if index in _indexes(status.get("completedIndexes")):
        return Status("succeeded", None, code or 0)
    if index in _indexes(status.get("failedIndexes")):
        if (pod or {}).get("status", {}).get("reason") == DEADLINE_EXCEEDED:
            return Status("timeout", f"reached its time limit ({DEADLINE_EXCEEDED} on "
                          "Kubernetes)", code)
        return Status("failed", _pod_reason(pod) or "failed on Kubernetes", code)
    conditions = {c["type"]: c for c in status.get("conditions", []) if c.get("status") == "True"}
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed:
        return Status("failed", f"{failed.get('reason')}: {failed.get('message')}", code)
    if "Suspended" in conditions or job["spec"].get("suspend"):
        return Status("pending", "the Job is suspended")
    phase = (pod or {}).get("status", {}).get("phase")
    if phase in ("Running", "Succeeded", "Failed"):  # the Job's count of it is on its way
        return Status("running")
    return Status("pending", _pod_reason(pod) or "no pod scheduled yet")


def _pod_reason(pod: dict[str, Any] | None) -> str | None:
    """Why a pod waits or failed, as the scheduler or the kubelet says it."""
    status = (pod or {}).get("status", {})
    for condition in status.get("conditions", []):
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"{condition.get('reason')}: {condition.get('message')}"
    for container in status.get("containerStatuses", []):
        state = container.get("state", {})
        detail = state.get("waiting") or state.get("terminated")
        if detail and detail.get("reason") not in (None, "Completed", "Error"):
            return f"{detail['reason']}: {detail.get('message', '')}".rstrip(": ")
    return status.get("reason")


def _exit_code(pod: dict[str, Any] | None) -> int | None:
    for container in (pod or {}).get("status", {}).get("containerStatuses", []):
        terminated = container.get("state", {}).get("terminated")
        if terminated is not None:
            return int(terminated["exitCode"])
    return None


def _indexes(ranges: str | None) -> set[int]:
    """The indexes of a Job status's "0-2,5"."""
    found: set[int] = set()
    for part in filter(None, (ranges or "").split(",")):
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return found


def _unique_name(name: str) -> str:
    """A valid, unused object name: a DNS label from `name` and a random suffix."""
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:50].rstrip("-")
    return f"{slug or 'gpuq'}-{secrets.token_hex(4)}"



def _json(response: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(response.data)
    return data
