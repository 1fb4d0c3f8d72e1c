"""The Kubernetes adapter against kmock's API emulator, with a test controller that runs
each Job index's container (the universal runner) as a local process (tests/k8s_cluster)."""

from __future__ import annotations

import base64
import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest

from adapters.kubernetes import KubernetesAdapter
from app.core.errors import GpuqError
from app.runtime import Runtime
from app.store.models import Job
from tests.contract.test_adapters import drive
from tests.support.k8s_cluster import Cluster, cluster_runtime
from tests.support.servers import until

pytestmark = pytest.mark.e2e


@pytest.fixture
def k8s(settings) -> Iterator[tuple[Cluster, KubernetesAdapter]]:
    with cluster_runtime(settings) as (cluster, rt):
        adapter = KubernetesAdapter()
        adapter.rt = rt
        adapter.vanished_grace_s = 0.5
        yield cluster, adapter
        adapter.api.close()


def _pod_env(job: dict) -> dict[str, str]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def cube(x: int) -> int:
    return x**3


def fail(message: str) -> None:
    raise ValueError(message)


def test_a_single_job_is_an_indexed_job_of_one(k8s, local, tmp_path: Path):
    cluster, adapter = k8s
    job = local.submit(f"echo rank $GPUQ_JOB_RANK > {tmp_path}/out", backend="kubernetes",
                       name="Nightly eval #3")
    rows = drive(adapter, local, [job.id])
    assert (rows[0]["status"], rows[0]["exit_code"]) == ("SUCCEEDED", 0)
    (created,) = cluster.jobs()
    name = created["metadata"]["name"]
    assert name.startswith("nightly-eval-3-") and rows[0]["backend_id"] == f"default/{name}/0"
    spec = created["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"],
            spec["backoffLimitPerIndex"]) == ("Indexed", 1, 1, 0)
    assert created["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "gpuq"
    assert spec["template"]["spec"]["containers"][0]["command"] == [
        "python", "-m", "adapters.runner"]
    assert (tmp_path / "out").read_text() == "rank 0\n"


def test_a_launch_is_one_job_whose_indexes_are_the_ranks(k8s, local, tmp_path: Path):
    cluster, adapter = k8s
    out = tmp_path / "ranks"
    out.mkdir()
    handle = local.launch(f"echo $GPUQ_NUM_JOBS > {out}/{{rank}}", num_jobs=5,
                          backend="kubernetes")
    rows = sorted(drive(adapter, local, handle.job_ids), key=lambda r: r["rank"])
    assert {r["status"] for r in rows} == {"SUCCEEDED"}
    (created,) = cluster.jobs()
    assert (created["spec"]["completions"], created["spec"]["parallelism"]) == (5, 5)
    assert created["metadata"]["labels"]["gpuq/launch"] == str(handle.id)
    assert [r["backend_id"].rsplit("/", 1)[1] for r in rows] == ["0", "1", "2", "3", "4"]
    assert sorted(int(p.name) for p in out.iterdir()) == [0, 1, 2, 3, 4]
    assert {p.read_text() for p in out.iterdir()} == {"5\n"}


def test_poll_lists_jobs_and_pods_once_per_namespace_by_label(k8s, local):
    cluster, adapter = k8s
    handle = local.launch("sleep 30", num_jobs=5, backend="kubernetes")
    adapter.sync()  # submits
    before = len(cluster.requests("GET", "/"))
    adapter.sync()  # polls the five replicas
    made = [r for r in cluster.requests("GET", "/")[before:] if "labelSelector" in r.params]
    assert sorted(r.url.path.rsplit("/", 1)[1] for r in made) == ["jobs", "pods"], (
        "one list of jobs and one of pods, not one call per replica")
    assert {r.params["labelSelector"] for r in made} == {"app.kubernetes.io/managed-by=gpuq"}
    local.call("cancel", ids=handle.job_ids)
    drive(adapter, local, handle.job_ids)


def test_a_failing_job_fails_with_its_exit_code(k8s, local):
    _, adapter = k8s
    job = local.submit("echo broken >&2; exit 7", backend="kubernetes")
    rows = drive(adapter, local, [job.id])
    assert (rows[0]["status"], rows[0]["exit_code"]) == ("FAILED", 7)


def test_function_results_and_remote_errors_are_routed_to_the_job(k8s, local):
    _, adapter = k8s
    ok = local.submit(cube, 4, backend="kubernetes")
    bad = local.submit(fail, "bad learning rate", backend="kubernetes")
    drive(adapter, local, [ok.id, bad.id])
    assert ok.result(timeout_s=5) == 64
    with pytest.raises(ValueError, match="bad learning rate"):
        bad.result(timeout_s=5)
    assert "raised builtins.ValueError" in bad.row()["reason"]


def test_cancel_deletes_the_job_with_its_pods(k8s, local):
    cluster, adapter = k8s
    job = local.submit("sleep 300", backend="kubernetes")
    until(lambda: adapter.sync() and job.status == "RUNNING")
    assert job.cancel() == {"cancelled": [], "cancelling": [job.id]}
    rows = drive(adapter, local, [job.id])
    assert rows[0]["status"] == "CANCELLED"
    (delete,) = cluster.requests("DELETE", "/jobs/")
    assert delete.params["propagationPolicy"] == "Foreground"
    assert cluster.jobs() == []
    until(lambda: not cluster.procs, timeout_s=10)


def test_cancelling_some_indexes_deletes_only_their_pods(k8s, local):
    cluster, adapter = k8s
    handle = local.launch("sleep 300", num_jobs=3, backend="kubernetes")
    until(lambda: adapter.sync() and set(handle.counts()) == {"RUNNING"})
    first, *rest = sorted(handle.job_ids)
    local.call("cancel", ids=[first])
    assert drive(adapter, local, [first])[0]["status"] == "CANCELLED"
    until(lambda: cluster.jobs()[0]["status"].get("failedIndexes") == "0")
    assert {r["status"] for r in local.rows(rest)} == {"RUNNING"}
    assert cluster.requests("DELETE", "/jobs/") == []
    local.call("cancel", ids=rest)
    assert {r["status"] for r in drive(adapter, local, rest)} == {"CANCELLED"}
    assert cluster.jobs() == []


def test_a_job_the_cluster_forgot_becomes_lost(k8s, local):
    cluster, adapter = k8s
    job = local.submit("sleep 300", backend="kubernetes")
    until(lambda: adapter.sync() and job.status == "RUNNING")
    (created,) = cluster.jobs()
    cluster.batch.delete_namespaced_job(created["metadata"]["name"], "default")
    rows = drive(adapter, local, [job.id], timeout_s=30)
    assert rows[0]["status"] == "LOST" and "no longer knows" in rows[0]["reason"]


def test_a_job_stuck_pending_fails_with_the_schedulers_reason(k8s, local):
    cluster, adapter = k8s
    cluster.schedulable = False
    adapter.pending_timeout_s = 0.5
    job = local.submit("true", backend="kubernetes", gpus=8)
    rows = drive(adapter, local, [job.id])
    assert rows[0]["status"] == "FAILED"
    assert "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu" in (
        rows[0]["reason"])
    until(lambda: cluster.jobs() == [], timeout_s=10)


def test_gpus_are_nvidia_gpu_limits(k8s, local):
    cluster, adapter = k8s
    cluster.schedulable = False
    local.submit("nvidia-smi", backend="kubernetes", gpus=2)
    local.submit("hostname", backend="kubernetes", gpus=0)
    adapter.sync()
    limits = sorted(str(j["spec"]["template"]["spec"]["containers"][0].get("resources"))
                    for j in cluster.jobs())
    assert limits == ["None", str({"limits": {"nvidia.com/gpu": "2"}})]


@pytest.mark.parametrize("inline_limit", [1 << 20, 64])
def test_payloads_on_both_sides_of_the_inline_threshold(k8s, local, inline_limit):
    cluster, adapter = k8s
    adapter.inline_limit_bytes = inline_limit
    handle = local.map(cube, [1, 2, 3], backend="kubernetes")
    drive(adapter, local, handle.job_ids)
    assert [job.result(timeout_s=5) for job in handle.jobs] == [1, 8, 27]
    (created,) = cluster.jobs()
    env = _pod_env(created)
    config_maps = cluster.core.list_namespaced_config_map("default").items
    if inline_limit > 64:
        assert "GPUQ_PAYLOAD" in env and config_maps == []
        return
    assert "GPUQ_PAYLOAD" not in env and env["GPUQ_PAYLOAD_FILE"] == "/var/run/gpuq/payload/payload"
    (config_map,) = config_maps
    assert cloudpickle.loads(base64.b64decode(config_map.binary_data["payload"]))["call"]
    assert [o.name for o in config_map.metadata.owner_references] == [
        created["metadata"]["name"]], "collected with its Job"
    pod = created["spec"]["template"]["spec"]
    assert pod["volumes"][0]["configMap"]["name"] == config_map.metadata.name


def test_a_payload_too_large_for_a_config_map_is_refused(k8s):
    _, adapter = k8s
    with pytest.raises(GpuqError, match="ConfigMap"):
        adapter.payload_env("launch:1", b"x" * (2 << 20), Job(id=1, command="", submitted_at=0.0))


def test_no_cluster_configuration_names_the_setting(settings, monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    adapter = KubernetesAdapter()
    adapter.rt = Runtime(settings)
    try:
        with pytest.raises(GpuqError, match=r"set GPUQ_K8S_API_URL.*kubeconfig"):
            adapter.poll(["default/gpuq-1/0"])
    finally:
        adapter.rt.close()


def test_the_store_claim_and_workdir_reach_every_pod(k8s, local):
    cluster, adapter = k8s
    cluster.schedulable = False
    adapter.rt.settings.k8s_store_claim = "gpuq-store"
    local.submit("python train.py", backend="kubernetes", workdir="/workspace")
    adapter.sync()
    [job] = cluster.jobs()
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "gpuq-store",
                               "persistentVolumeClaim": {"claimName": "gpuq-store"}}]
    [container] = pod["containers"]
    store = str(adapter.store_dir(adapter.rt.settings))
    assert container["volumeMounts"] == [{"name": "gpuq-store", "mountPath": store}]
    assert container["workingDir"] == "/workspace"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["GPUQ_RESULT_DIR"].startswith(store), "results land on the claim"


def _decoded(obj: object) -> str:
    """An object as JSON, with every base64 value it holds decoded beside it (a payload or
    a ConfigMap's binaryData hides text that way)."""
    text = json.dumps(obj, default=str)
    for word in re.findall(r"[A-Za-z0-9+/=]{16,}", text):
        with contextlib.suppress(ValueError):
            text += "\n" + base64.b64decode(word, validate=True).decode("latin-1")
    return text


@pytest.mark.parametrize("inline_limit", [1 << 20, 64])
def test_a_secret_reaches_the_pod_only_through_a_secret_the_job_owns(k8s, local, tmp_path,
                                                                     inline_limit):
    cluster, adapter = k8s
    adapter.inline_limit_bytes = inline_limit
    value = "k8s-secret-" + tmp_path.name
    job = local.submit(f"echo $API_TOKEN > {tmp_path}/seen", backend="kubernetes",
                       secrets={"API_TOKEN": value})
    rows = drive(adapter, local, [job.id])
    assert rows[0]["status"] == "SUCCEEDED"
    assert (tmp_path / "seen").read_text() == f"{value}\n", "the job sees its secret"
    (created,) = cluster.jobs()
    assert value not in _decoded(created), "not in the Job's spec, nor in its inline payload"
    config_maps = [c.to_dict() for c in cluster.core.list_namespaced_config_map("default").items]
    assert (len(config_maps) == 1) == (inline_limit == 64)
    assert value not in _decoded(config_maps)
    (secret,) = cluster.core.list_namespaced_secret("default").items
    assert [o.name for o in secret.metadata.owner_references] == [created["metadata"]["name"]]
    assert [base64.b64decode(v).decode() for v in secret.data.values()] == [value]
    (ref,) = [e for e in _pod_env_entries(created) if "valueFrom" in e]
    assert ref == {"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": secret.metadata.name, "key": next(iter(secret.data))}}}


def _pod_env_entries(job: dict) -> list[dict]:
    return list(job["spec"]["template"]["spec"]["containers"][0]["env"])


def test_a_job_past_its_time_limit_is_stopped_by_the_kubelet_and_ends_timeout(k8s, local):
    cluster, adapter = k8s
    over = local.submit("sleep 300", backend="kubernetes", time="2s", max_restarts=2)
    within = local.submit("echo fine", backend="kubernetes", time="1h")
    rows = {r["id"]: r for r in drive(adapter, local, [over.id, within.id])}
    # The pod carries the limit, counted from its start
    deadlines = {job["spec"]["template"]["spec"].get("activeDeadlineSeconds")
                 for job in cluster.jobs()}
    assert deadlines == {2, 3600}
    assert rows[over.id]["status"] == "TIMEOUT", rows[over.id]
    assert "DeadlineExceeded" in rows[over.id]["reason"]
    assert rows[over.id]["restart_count"] == 0, "a time-out is never restarted"
    assert rows[within.id]["status"] == "SUCCEEDED"
