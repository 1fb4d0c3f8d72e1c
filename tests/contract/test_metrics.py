"""The dashboard's /metrics on a real Redis and database: every series carries the state of
the queue, the GPUs and the histograms at the moment of the scrape, behind the dashboard's
token; and the Redis histograms (app/store/histograms.py) on their own."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlmodel import col

from app.core.states import JobState
from app.dashboard import create_app
from app.runtime import Runtime
from app.store import cluster, histograms
from app.store.jobs import create_jobs, transition
from app.store.models import Job
from app.store.spec import JobSpec
from tests.support.dashboard_http import BASE_URL, dashboard_client

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
S = JobState
MIB = 2**20


@pytest.fixture
def api(settings, local) -> Iterator[TestClient]:
    with dashboard_client(create_app(settings, local)) as http:
        yield http


def scrape(http: TestClient) -> Samples:
    response = http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples}


def of(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: Samples, name: str, label: str) -> dict[str, float]:
    """label value -> value, for a series with one label."""
    return {dict(key)[label]: v for (n, key), v in samples.items() if n == name}


def _jobs(rt: Runtime, owner: str, n: int, gpus: int, project: str | None = None,
          path: tuple[JobState, ...] = ()) -> list[int]:
    """`n` jobs of `owner`, each moved along `path` from PENDING."""
    with rt.session() as session:
        _, ids = create_jobs(session, JobSpec(command=f"train {owner}", gpus=gpus,
                                              project=project), n, launch=False, owner=owner)
    for target in path:
        values = {"host": "testhost", "gpu_ids": list(range(gpus))} \
            if target is S.STARTING else None
        with rt.session() as session:
            transition(session, target, "test", [col(Job.id).in_(ids)], values)
    return ids


def test_metrics_carry_jobs_gpus_and_histograms_of_the_moment(api, rt):
    started, running = (S.STARTING,), (S.STARTING, S.RUNNING)
    _jobs(rt, "alice", 1, 2, "vision")
    _jobs(rt, "alice", 1, 2, "vision", started)
    _jobs(rt, "alice", 1, 2, "vision", running)
    _jobs(rt, "alice", 1, 2, "vision", (*running, S.SUCCEEDED))
    _jobs(rt, "alice", 1, 1, "nlp", running)
    bob_pending = _jobs(rt, "bob", 2, 1)
    _jobs(rt, "bob", 1, 1, None, (*running, S.CANCELLING))
    _jobs(rt, "bob", 1, 0, None, running)  # a CPU job: no GPUs held
    _jobs(rt, "bob", 1, 1, None, (S.CANCELLED,))

    cluster.register_host(rt.redis, "testhost", {0: {"name": "Fake"}, 1: {"name": "Fake"}})
    cluster.register_host(rt.redis, "other", {3: {"name": "Fake"}})
    cluster.publish_reading(rt.redis, "testhost", 0, {
        "memory_used_mb": 30000, "memory_total_mb": 81920, "utilization_pct": 90}, ttl_s=60)
    cluster.publish_reading(rt.redis, "other", 3, {
        "memory_used_mb": 0, "memory_total_mb": 40960, "utilization_pct": 0}, ttl_s=60)
    for seconds in (0.003, 0.02, 0.02, 20.0):
        histograms.observe(rt.redis, histograms.DISPATCH_PASS, seconds)
    for seconds in (2.0, 4000.0):
        histograms.observe(rt.redis, histograms.QUEUE_WAIT, seconds)

    got = scrape(api)

    assert series(got, "gpuq_jobs", "state") == {
        **{s.value: 0 for s in JobState}, "PENDING": 3, "STARTING": 1, "RUNNING": 3,
        "SUCCEEDED": 1, "CANCELLING": 1, "CANCELLED": 1}
    by_user = {tuple(sorted(dict(k).items())): v for (n, k), v in got.items()
               if n == "gpuq_user_jobs"}
    assert by_user == {
        (("state", state), ("user", user)): n for user, states in {
            "alice": {"PENDING": 1, "STARTING": 1, "RUNNING": 2, "CANCELLING": 0},
            "bob": {"PENDING": 2, "STARTING": 0, "RUNNING": 1, "CANCELLING": 1},
        }.items() for state, n in states.items()}
    assert series(got, "gpuq_user_running_gpus", "user") == {"alice": 5, "bob": 1}
    assert series(got, "gpuq_project_running_gpus", "project") == {
        "vision": 4, "nlp": 1, "bob": 1}

    assert of(got, "gpuq_gpu_utilization_percent", host="testhost", gpu="0") == 90
    assert of(got, "gpuq_gpu_memory_used_bytes", host="testhost", gpu="0") == 30000 * MIB
    assert of(got, "gpuq_gpu_memory_total_bytes", host="testhost", gpu="0") == 81920 * MIB
    assert of(got, "gpuq_gpu_utilization_percent", host="other", gpu="3") == 0
    assert of(got, "gpuq_gpu_memory_total_bytes", host="other", gpu="3") == 40960 * MIB
    # testhost's GPU 1 has no reading: no samples rather than made-up zeros.
    assert not [k for k in got if ("gpu", "1") in k[1]]

    assert of(got, "gpuq_dispatch_pass_seconds_count") == 4
    assert of(got, "gpuq_dispatch_pass_seconds_sum") == pytest.approx(20.043)
    assert of(got, "gpuq_dispatch_pass_seconds_bucket", le="0.005") == 1
    assert of(got, "gpuq_dispatch_pass_seconds_bucket", le="0.025") == 3
    assert of(got, "gpuq_dispatch_pass_seconds_bucket", le="10.0") == 3
    assert of(got, "gpuq_dispatch_pass_seconds_bucket", le="+Inf") == 4
    assert of(got, "gpuq_queue_wait_seconds_count") == 2
    assert of(got, "gpuq_queue_wait_seconds_sum") == pytest.approx(4002.0)
    assert of(got, "gpuq_queue_wait_seconds_bucket", le="5.0") == 1
    assert of(got, "gpuq_queue_wait_seconds_bucket", le="3600.0") == 1
    assert of(got, "gpuq_queue_wait_seconds_bucket", le="10800.0") == 2

    # Each scrape reads the state of its moment.
    with rt.session() as session:
        transition(session, S.CANCELLED, "test", [col(Job.id).in_(bob_pending)])
    histograms.observe(rt.redis, histograms.QUEUE_WAIT, 1.0)
    again = scrape(api)
    assert of(again, "gpuq_jobs", state="PENDING") == 1
    assert of(again, "gpuq_jobs", state="CANCELLED") == 3
    assert of(again, "gpuq_user_jobs", user="bob", state="PENDING") == 0
    assert of(again, "gpuq_queue_wait_seconds_count") == 3


def test_metrics_of_an_empty_stack_are_zeros(api):
    got = scrape(api)
    assert series(got, "gpuq_jobs", "state") == {s.value: 0 for s in JobState}
    assert of(got, "gpuq_dispatch_pass_seconds_count") == 0
    assert of(got, "gpuq_queue_wait_seconds_bucket", le="+Inf") == 0
    assert not series(got, "gpuq_user_jobs", "user")


def test_metrics_want_the_dashboards_token(settings, local):
    guarded = settings.model_copy(update={"dashboard_token": "open-sesame"})
    with TestClient(create_app(guarded, local), base_url=BASE_URL) as http:
        refused = http.get("/metrics")
        assert refused.status_code == 401 and "gpuq_jobs" not in refused.text
        assert http.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = http.get("/metrics", headers={"Authorization": "Bearer open-sesame"})
        assert ok.status_code == 200 and "gpuq_jobs{" in ok.text


def test_histograms_keep_cumulative_buckets_sum_and_count(rt):
    r = rt.redis
    for seconds in (0.5, 1.0, 3.0, 3.0, 90.0, 10 * 86400.0, -2.0):
        histograms.observe(r, histograms.QUEUE_WAIT, seconds)
    buckets, total, count = histograms.read(r, histograms.QUEUE_WAIT)
    assert [le for le, _ in buckets] == [
        *(repr(b) for b in histograms.BOUNDS[histograms.QUEUE_WAIT]), "+Inf"]
    cumulative = dict(buckets)
    assert (cumulative["1.0"], cumulative["5.0"], cumulative["60.0"]) == (3, 5, 5)
    assert (cumulative["300.0"], cumulative["604800.0"], cumulative["+Inf"]) == (6, 6, 7)
    assert [n for _, n in buckets] == sorted(n for _, n in buckets)
    assert count == 7 and total == pytest.approx(0.5 + 1 + 3 + 3 + 90 + 10 * 86400)
    assert histograms.read(r, histograms.DISPATCH_PASS) == (
        [(repr(b), 0) for b in histograms.BOUNDS[histograms.DISPATCH_PASS]] + [("+Inf", 0)],
        0.0, 0)


def test_a_histogram_that_cannot_be_written_warns_and_never_raises(caplog):
    away = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5,
                       retry=Retry(NoBackoff(), 0))
    with caplog.at_level(logging.WARNING, logger="app.store.histograms"):
        histograms.observe(away, histograms.DISPATCH_PASS, 0.01)
    assert "observation of 0.01 s lost" in caplog.text
    away.close()
