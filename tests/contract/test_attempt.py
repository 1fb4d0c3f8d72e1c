"""An attempt watched by its worker outlives a broker outage: the job's process does not
need Redis, so Redis going away while it runs must not end the watch or fail the job."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app import runtime as runtime_module
from app.client import Client
from app.core.settings import Settings
from app.runtime import Runtime
from app.store import cluster
from app.store.embedded_redis import EmbeddedRedis
from scheduler.worker.attempt import run_attempt
from tests.support.servers import EXTERNAL_DB, _reset_database, until


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[tuple[Settings, EmbeddedRedis]]:
    """A Redis of this test's own, which it stops and starts again."""
    home = tmp_path / "home"
    server = EmbeddedRedis(Settings(home=home, _env_file=None))
    url = server.start()
    if EXTERNAL_DB:
        _reset_database(EXTERNAL_DB)
    settings = Settings(home=home, redis_url=url, database_url=EXTERNAL_DB, hostname="outage",
                        fake_gpus=0, heartbeat_s=0.2, _env_file=None)
    try:
        yield settings, server
    finally:
        server.stop()


def test_a_running_job_succeeds_through_a_broker_outage_longer_than_redis_retries(
        own_broker, monkeypatch):
    settings, server = own_broker
    # Redis calls give up after one quick retry, so the outage outlasts them.
    monkeypatch.setattr(runtime_module, "REDIS_RETRIES", 1)
    client = Client(settings, "local")
    with redis.Redis.from_url(settings.redis_url) as r:  # a CPU slot in service
        cluster.beat_cpu(r, settings.hostname, 1, 600)
    job = client.submit("sleep 3; echo ran", gpus=0)
    assert job.status == "STARTING"
    worker_rt = Runtime(settings, wait_for_broker=True)
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(run_attempt(worker_rt, job.id, 1)))
    try:
        worker.start()
        until(lambda: job.status == "RUNNING", timeout_s=30)
        server.stop()  # while the job runs: its watch loop meets no broker for 1.5 s
        threading.Event().wait(1.5)
        assert server.start() == settings.redis_url
        worker.join(timeout=30)
        assert outcome == ["SUCCEEDED"]
        assert job.row()["exit_code"] == 0 and "ran" in job.logs()
    finally:
        worker.join(timeout=30)
        worker_rt.close()
        client.close()
