"""Kubernetes manifests: every object is one the API knows, field for field (checked with
the official client's models), and the deployment's invariants hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

from app.core.security import is_loopback
from app.core.settings import Settings
from tests.support.servers import ROOT
from tests.unit.test_deploy_files import gpuq_subcommands

K8S = ROOT / "deploy" / "k8s"
FILES = sorted(K8S.rglob("*.yaml"))


def _documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in FILES for doc in yaml.safe_load_all(path.read_text())
            if doc is not None]


def _objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _documents() if doc["kind"] == kind]


def _containers(kind: str | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container of every workload."""
    return [(doc, c) for _, doc in _documents() if doc["kind"] in ("Deployment", "DaemonSet")
            and kind in (None, doc["kind"]) for c in doc["spec"]["template"]["spec"]["containers"]]


def _running(subcommand: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(w, c) for w, c in _containers() if c["command"][1:2] == [subcommand]]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


def _drop_empty(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_empty(v) for k, v in value.items() if v not in (None, {}, [])}
    if isinstance(value, list):
        return [_drop_empty(v) for v in value]
    return value


def test_there_are_manifests():
    kinds = {doc["kind"] for _, doc in _documents()}
    assert {"DaemonSet", "Deployment", "Service", "ConfigMap", "Secret"} <= kinds


@pytest.mark.parametrize(("path", "doc"), _documents(),
                         ids=[f"{p.name}:{d['kind']}/{d['metadata']['name']}"
                              for p, d in _documents()])
def test_every_object_round_trips_through_the_kubernetes_models(path, doc):
    api = ApiClient()
    version = doc["apiVersion"].rpartition("/")[2]
    model = f"{version.capitalize()}{doc['kind']}"
    obj = api.deserialize(json.dumps(doc), model, "application/json")
    # The models drop fields they do not know: a misspelt field makes the two differ.
    assert _drop_empty(api.sanitize_for_serialization(obj)) == _drop_empty(doc)


def test_gpu_workers_run_on_every_gpu_node_and_ask_for_its_gpus():
    [(daemonset, container)] = _containers("DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["nodeSelector"]
    assert container["command"] == ["gpuq", "worker"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    hostname = _env(container)["GPUQ_HOSTNAME"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert hostname == "spec.nodeName"
    assert pod["terminationGracePeriodSeconds"] > Settings(_env_file=None).kill_grace_s


def test_exactly_one_beat_that_is_never_two_even_during_a_rollout():
    [(beat, _)] = _running("beat")
    assert beat["kind"] == "Deployment"
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"


def test_every_container_runs_a_gpuq_command():
    commands = sorted(c["command"][1] for _, c in _containers())
    assert all(c["command"][0] == "gpuq" for _, c in _containers())
    assert set(commands) <= gpuq_subcommands()
    assert commands == ["beat", "control-worker", "dashboard", "flower", "worker"]


def _settings_of(container: dict[str, Any]) -> dict[str, str]:
    """The GPUQ_* values a container sees from the ConfigMap and literal env entries."""
    maps = {m["metadata"]["name"]: m["data"] for m in _objects("ConfigMap")}
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            values.update(maps[source["configMapRef"]["name"]])
    values.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return values


@pytest.mark.parametrize(("subcommand", "secret"), [
    ("flower", "GPUQ_FLOWER_BASIC_AUTH"), ("dashboard", "GPUQ_DASHBOARD_TOKEN")])
def test_flower_and_the_dashboard_beyond_loopback_take_their_password_from_the_secret(
        subcommand, secret):
    [(_, container)] = _running(subcommand)
    address = _settings_of(container).get(f"GPUQ_{subcommand.upper()}_ADDRESS", "127.0.0.1")
    assert not is_loopback(address), "a Service could not reach it"
    assert _env(container)[secret]["valueFrom"]["secretKeyRef"]["name"] == "gpuq-secrets"
    [service] = [s for s in _objects("Service") if s["metadata"]["name"] == f"gpuq-{subcommand}"]
    assert service["spec"]["selector"] == _workload_labels(subcommand)


def _workload_labels(subcommand: str) -> dict[str, str]:
    [(workload, _)] = _running(subcommand)
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def test_redis_and_postgres_are_external_services_the_secret_points_at():
    external = {s["metadata"]["name"] for s in _objects("Service")
                if s["spec"].get("type") == "ExternalName"}
    assert {"gpuq-redis", "gpuq-postgres"} <= external
    [secret] = _objects("Secret")
    assert "@gpuq-redis." in secret["stringData"]["GPUQ_REDIS_URL"]
    assert "@gpuq-postgres." in secret["stringData"]["GPUQ_DATABASE_URL"]


def test_every_setting_named_is_a_gpuq_setting_and_every_secret_key_exists():
    known = {f"GPUQ_{name.upper()}" for name in Settings.model_fields}
    [config] = _objects("ConfigMap")
    [secret] = _objects("Secret")
    assert set(config["data"]) - known == set()
    assert set(secret["stringData"]) - known == set()
    for _, container in _containers():
        for entry in container.get("env", []):
            assert entry["name"] in known
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secret["stringData"]
