"""GPUJobScheduler, the older single-file API, over the real system (embedded Redis,
SQLite, a worker process per GPU, the jobs-file watcher)."""

from __future__ import annotations

import time

import pytest

from app.core.settings import Settings
from scheduler import GPUJobScheduler

pytestmark = pytest.mark.e2e


def test_facade_runs_added_jobs_and_jobs_file_lines(tmp_path):
    jobs_file = tmp_path / "jobs.txt"
    jobs_file.write_text("name=from-file -- echo from the file\n")
    settings = Settings(home=tmp_path / "home", redis_url=None, database_url=None,
                        hostname="facade", heartbeat_s=1, cpu_slots=0, _env_file=None)
    scheduler = GPUJobScheduler(num_gpus=2, jobs_file_path=jobs_file, settings=settings)
    scheduler.start()
    try:
        gpus = scheduler.get_gpu_status()
        assert [(g["host"], g["index"], g["alive"]) for g in gpus] == [
            ("facade", 0, True), ("facade", 1, True)]
        job_id = scheduler.add_job("bash", env={"WHO": "facade"}, args=["-c", "echo hello $WHO"])
        client = scheduler.client()
        assert client.job(job_id).wait(timeout_s=60) == "SUCCEEDED"
        assert "hello facade" in client.job(job_id).logs()
        deadline = time.monotonic() + 30
        while not client.call("queue", name="from-file")["jobs"] and time.monotonic() < deadline:
            time.sleep(0.2)
        from_file = client.call("queue", name="from-file")["jobs"]
        assert len(from_file) == 1
        assert client.job(from_file[0]["id"]).wait(timeout_s=60) == "SUCCEEDED"
    finally:
        scheduler.stop()
    from app.store.embedded_redis import find_embedded

    assert find_embedded(scheduler.settings) is None, "the embedded broker was stopped"
