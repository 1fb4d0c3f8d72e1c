"""A Kubernetes stand-in for the adapter tests: kmock's API emulator on 127.0.0.1, and a
controller that does what the Job controller and the kubelet would, through the same API.

For each index of an Indexed Job it creates a pod and runs that pod's container, the
universal runner, as a local process with the pod's environment and JOB_COMPLETION_INDEX
(ConfigMap volumes are copied to a directory standing for their mount). When the process
ends it records the exit code on the pod and the index on the Job's status, as
completedIndexes or failedIndexes, with the Complete or Failed condition once every index
has ended. A Job that disappears takes its processes and pods with it (foreground or
background deletion alike); a deleted pod ends its process and fails its index.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kmock
from kubernetes import client

from app.core.settings import Settings
from app.runtime import Runtime
from tests.support.servers import ROOT

JOB_NAME, INDEX = "batch.kubernetes.io/job-name", "batch.kubernetes.io/job-completion-index"
UNSCHEDULABLE = ("Unschedulable", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")


class Cluster:
    """The emulator in a thread of its own, and the controller in another."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.schedulable = True  # False: pods stay Pending, unschedulable
        self.url = ""
        self.emulator: kmock.KubernetesEmulator | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopping = threading.Event()  # the controller's signal, then the server's
        self._closing = threading.Event()
        self._server = threading.Thread(target=self._loop.run_until_complete,
                                        args=(self._serve(),), daemon=True)
        self._controller = threading.Thread(target=self._control, daemon=True)
        self.procs: dict[tuple[str, int], subprocess.Popen[bytes]] = {}
        self.pods: dict[tuple[str, int], str] = {}
        self.error: Exception | None = None
        self.ended: dict[str, tuple[set[int], set[int]]] = {}  # job: completed, failed
        self.started: dict[tuple[str, int], float] = {}  # when each pod began to run
        self.deadlined: set[tuple[str, int]] = set()  # pods stopped at their deadline

    def __enter__(self) -> Cluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._server.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes emulator did not start")
        configuration = client.Configuration()
        configuration.host = self.url
        self.api = client.ApiClient(configuration)
        self.batch, self.core = client.BatchV1Api(self.api), client.CoreV1Api(self.api)
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._controller.join(30)
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.api.close()
        self._closing.set()
        self._server.join(30)
        self._loop.close()
        if self.error is not None:
            raise RuntimeError("the test controller failed") from self.error

    async def _serve(self) -> None:
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            for resource in ("batch/v1/jobs", "v1/pods", "v1/configmaps", "v1/secrets"):
                emulator.resources[resource] = {}
            self.emulator, self.url = emulator, str(server.url).rstrip("/")
            self._ready.set()
            while not self._closing.is_set():
                await asyncio.sleep(0.05)

    def requests(self, method: str, path_part: str) -> list[Any]:
        """The API requests made so far with this method whose path contains `path_part`."""
        assert self.emulator is not None
        return [r for r in list(self.emulator._requests)
                if r.method.value.upper() == method and path_part in r.url.path]

    def jobs(self) -> list[dict[str, Any]]:
        listed = self.batch.list_job_for_all_namespaces(_preload_content=False)
        return list(json.loads(listed.data)["items"])

    # -- the controller ------------------------------------------------------------------
    def _control(self) -> None:
        while not self._stopping.wait(0.05):
            try:
                self._step()
            except client.ApiException as e:
                if e.status != 404:  # a 404 raced with a deletion: the next step sees it
                    self.error = e
                    return
            except Exception as e:  # the test fails on leaving the cluster
                self.error = e
                return

    def _step(self) -> None:
        jobs = {j["metadata"]["name"]: j for j in self.jobs()}
        pods = {p["metadata"]["name"] for p in json.loads(self.core.list_namespaced_pod(
            "default", _preload_content=False).data)["items"]}
        for name, job in jobs.items():
            for index in range(job["spec"]["completions"]):
                if (name, index) not in self.pods:
                    pods.add(self._start(job, index))
        self._watch(jobs, pods)
        for (name, _), pod in self.pods.items():
            if name not in jobs and pod in pods:  # the garbage collector's part
                self.core.delete_namespaced_pod(pod, "default", _preload_content=False)
                pods.discard(pod)

    def _watch(self, jobs: dict[str, dict[str, Any]], pods: set[str]) -> None:
        """The kubelet's part: stop what was deleted or ran past its deadline; record
        what ended."""
        for (name, index), proc in list(self.procs.items()):
            if name not in jobs or self.pods[(name, index)] not in pods:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            elif self._past_deadline(jobs[name], (name, index)):  # the kubelet's part
                self.deadlined.add((name, index))
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            code = proc.poll()
            if code is not None:
                code = 128 - code if code < 0 else code  # as a container runtime reports it
                del self.procs[(name, index)]
                if name in jobs:
                    self._finish(jobs[name], index, code, self.pods[(name, index)] in pods)

    def _start(self, job: dict[str, Any], index: int) -> str:
        name, template = job["metadata"]["name"], job["spec"]["template"]
        pod = f"{name}-{index}"
        self.pods[(name, index)] = pod
        labels = {**template["metadata"]["labels"], JOB_NAME: name, INDEX: str(index)}
        status: dict[str, Any] = {"phase": "Running"}
        if not self.schedulable:
            reason, message = UNSCHEDULABLE
            status = {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": reason,
                "message": message}]}
        self.core.create_namespaced_pod("default", {
            "metadata": {"name": pod, "labels": labels}, "spec": template["spec"],
            "status": status}, _preload_content=False)
        if self.schedulable:
            self.procs[(name, index)] = self._run(pod, template["spec"], index)
            self.started[(name, index)] = time.monotonic()
            self._patch_job(name, {"active": len(self._live(name))})
        return pod

    def _run(self, pod: str, spec: dict[str, Any], index: int) -> subprocess.Popen[bytes]:
        container = spec["containers"][0]
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        for e in container.get("env", []):  # the kubelet resolves secretKeyRef
            if ref := e.get("valueFrom", {}).get("secretKeyRef"):
                secret = json.loads(self.core.read_namespaced_secret(
                    ref["name"], "default", _preload_content=False).data)
                env[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        for mount in container.get("volumeMounts", []):
            local = self.workdir / pod / mount["name"]
            local.mkdir(parents=True)
            volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            config_map = json.loads(self.core.read_namespaced_config_map(
                volume["configMap"]["name"], "default", _preload_content=False).data)
            for key, value in config_map.get("binaryData", {}).items():
                (local / key).write_bytes(base64.b64decode(value))
            env = {k: v.replace(mount["mountPath"], str(local)) for k, v in env.items()}
        env.update(JOB_COMPLETION_INDEX=str(index), PYTHONPATH=str(ROOT),
                   PATH=os.environ["PATH"])
        with open(self.workdir / f"{pod}.log", "ab") as log:
            return subprocess.Popen([sys.executable, "-m", "adapters.runner"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                    start_new_session=True)

    def _past_deadline(self, job: dict[str, Any], key: tuple[str, int]) -> bool:
        """Whether a running pod has been active past its activeDeadlineSeconds."""
        deadline = job["spec"]["template"]["spec"].get("activeDeadlineSeconds")
        return (deadline is not None and key not in self.deadlined
                and time.monotonic() - self.started[key] > deadline)

    def _live(self, name: str) -> list[int]:
        return [index for (job, index) in self.procs if job == name]

    def _finish(self, job: dict[str, Any], index: int, code: int, pod_exists: bool) -> None:
        name = job["metadata"]["name"]
        if pod_exists:
            status: dict[str, Any] = {
                "phase": "Succeeded" if code == 0 else "Failed",
                "containerStatuses": [{"name": "job", "state": {"terminated": {
                    "exitCode": code, "reason": "Completed" if code == 0 else "Error"}}}]}
            if (name, index) in self.deadlined:
                status.update(phase="Failed", reason="DeadlineExceeded", message=(
                    "Pod was active on the node longer than the specified deadline"))
            self.core.patch_namespaced_pod_status(self.pods[(name, index)], "default",
                                                  {"status": status}, _preload_content=False)
        completed, failed = self.ended.setdefault(name, (set(), set()))
        (completed if code == 0 and pod_exists else failed).add(index)
        patch: dict[str, Any] = {"completedIndexes": _ranges(completed),
                                 "failedIndexes": _ranges(failed),
                                 "active": len(self._live(name))}
        if len(completed | failed) == job["spec"]["completions"]:
            patch["conditions"] = [{"type": "Failed" if failed else "Complete",
                                    "status": "True",
                                    "reason": "FailedIndexes" if failed else "Completed",
                                    "message": "Job has failed indexes" if failed else ""}]
        self._patch_job(name, patch)

    def _patch_job(self, name: str, status: dict[str, Any]) -> None:
        self.batch.patch_namespaced_job_status(name, "default", {"status": status},
                                               _preload_content=False)


def _ranges(indexes: set[int]) -> str:
    """Kubernetes' compact form: {0, 1, 2, 5} is "0-2,5"."""
    parts: list[list[int]] = []
    for i in sorted(indexes):
        if parts and parts[-1][-1] == i - 1:
            parts[-1].append(i)
        else:
            parts.append([i])
    return ",".join(str(p[0]) if len(p) == 1 else f"{p[0]}-{p[-1]}" for p in parts)


@contextlib.contextmanager
def cluster_runtime(settings: Settings) -> Iterator[tuple[Cluster, Runtime]]:
    """A running cluster, and a runtime whose settings point the adapter at it."""
    with Cluster(settings.home / "k8s") as cluster:
        rt = Runtime(settings.model_copy(update={"k8s_api_url": cluster.url}))
        try:
            yield cluster, rt
        finally:
            rt.close()
