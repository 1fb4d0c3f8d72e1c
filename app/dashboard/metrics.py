"""GET /metrics: the queue, the GPUs and the dispatcher for Prometheus, read at each scrape.

One collector per app, on a registry of its own (never the process-wide default one): jobs
per state and the GPU table through the operations layer (`status`), jobs and held GPUs per
user and project from the store, and the histograms that GPU workers and beat keep in
Redis. Behind the same token as every other route (auth.token_middleware), and for the
stack's owner and admins only: its series name every user."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from app.client import Client
from app.core.states import JobState
from app.dashboard.api import actor_of
from app.ops.visibility import check_sees_everyone
from app.store import histograms, occupancy

PREFIX = "gpuq"
MIB = 2**20
router = APIRouter(include_in_schema=False)


class GpuqCollector(Collector):
    """Every series of /metrics, read afresh at each collect."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def collect(self) -> Iterable[Metric]:
        status = self.client.call("status")
        rt = self.client.rt
        with rt.session() as session:
            by_owner = occupancy.jobs_by_owner(session)
            user_gpus = occupancy.held_gpus_by(session, "owner")
            project_gpus = occupancy.held_gpus_by(session, "project")
        yield _jobs_by_state(status["counts"])
        yield _jobs_by_user(by_owner)
        yield _held(f"{PREFIX}_user_running_gpus", "GPUs held by a user's local jobs "
                    "(STARTING, RUNNING, CANCELLING).", "user", user_gpus)
        yield _held(f"{PREFIX}_project_running_gpus", "GPUs held by a project's local jobs "
                    "(STARTING, RUNNING, CANCELLING).", "project", project_gpus)
        yield from _gpu_readings(status["hosts"])
        yield _histogram(rt.redis, histograms.DISPATCH_PASS,
                         "Duration of one pass of the dispatcher.")
        yield _histogram(rt.redis, histograms.QUEUE_WAIT,
                         "Time from a job's submission to its dispatch.")


def _jobs_by_state(counts: dict[str, int]) -> Metric:
    family = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs per state.", labels=["state"])
    for state in JobState:
        family.add_metric([state.value], counts.get(state.value, 0))
    return family


def _jobs_by_user(by_owner: dict[tuple[str, str], int]) -> Metric:
    family = GaugeMetricFamily(
        f"{PREFIX}_user_jobs", "Jobs per user, in the states a job waits or runs in.",
        labels=["user", "state"])
    for user in sorted({owner for owner, _ in by_owner}):
        for state in occupancy.QUEUED_STATES:
            family.add_metric([user, state.value], by_owner.get((user, state.value), 0))
    return family


def _held(name: str, documentation: str, label: str, held: dict[str, int]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for who, gpus in sorted(held.items()):
        family.add_metric([who], gpus)
    return family


def _gpu_readings(hosts: list[dict[str, Any]]) -> Iterator[Metric]:
    """Each GPU's latest monitor reading; a GPU without one has no samples."""
    labels = ["host", "gpu"]
    utilization = GaugeMetricFamily(f"{PREFIX}_gpu_utilization_percent",
                                    "GPU utilisation at the latest monitor reading.", labels=labels)
    used = GaugeMetricFamily(f"{PREFIX}_gpu_memory_used_bytes",
                             "GPU memory in use at the latest monitor reading.", labels=labels)
    total = GaugeMetricFamily(f"{PREFIX}_gpu_memory_total_bytes",
                              "GPU memory, as the latest monitor reading has it.", labels=labels)
    for host in hosts:
        for gpu in host["gpus"]:
            reading = gpu.get("reading")
            if not reading:
                continue
            where = [host["host"], str(gpu["index"])]
            for family, field, scale in ((utilization, "utilization_pct", 1),
                                         (used, "memory_used_mb", MIB),
                                         (total, "memory_total_mb", MIB)):
                if reading.get(field) is not None:
                    family.add_metric(where, reading[field] * scale)
    yield from (utilization, used, total)


def _histogram(r: Any, name: str, documentation: str) -> Metric:
    buckets, total, _count = histograms.read(r, name)
    return HistogramMetricFamily(f"{PREFIX}_{name}", documentation, buckets=buckets,
                                 sum_value=total)


def registry_for(client: Client) -> CollectorRegistry:
    """A registry of this app's own, holding its one collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GpuqCollector(client))
    return registry


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """The current series in Prometheus's text format (0.0.4, which generate_latest writes)."""
    check_sees_everyone(actor_of(request), "the metrics")
    registry: CollectorRegistry = request.app.state.metrics
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)
