"""The baseline: a plain Celery app on the same Redis, with no gpuq in the path."""

from __future__ import annotations

import os
import subprocess
import time

import redis
from celery import Celery

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")
app = Celery("plain", broker=BROKER, set_as_current=False)
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                worker_prefetch_multiplier=1, worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True)
_counter = redis.Redis.from_url(BROKER)


@app.task(name="plain.run_true")
def run_true() -> None:
    """What a plain Celery GPU queue does per job: run the command in a subprocess."""
    subprocess.run(["true"], check=True)
    _counter.incr("bench:plain:done")


@app.task(name="plain.started")
def started(key: str) -> None:
    """Record when the task began (for the latency baseline)."""
    _counter.rpush(key, repr(time.time()))


@app.task(name="plain.carry")
def carry(payload: str) -> None:
    """A task that carries its payload inline (for the bulk-launch baseline)."""
