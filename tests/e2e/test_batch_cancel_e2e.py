"""A batch job's cancel reaches its backend at once, as a submit does, not on the backend's
next backed-off sync: a stack with no beat at all (no periodic sync) still stops it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.client import Client
from app.core.procgroup import group_exists
from app.core.settings import Settings
from app.runtime import Runtime
from tests.support.servers import Stack, until

pytestmark = pytest.mark.e2e


@pytest.fixture
def no_beat(stack_settings: Settings) -> Iterator[Client]:
    """A GPU worker and a control worker, and no beat: only nudges sync a batch backend."""
    stack_settings.home.mkdir(parents=True, exist_ok=True)
    stack = Stack(stack_settings, stack_settings.home)
    stack.start("worker", "control-worker")
    rt = Runtime(stack_settings)
    client = Client(stack_settings, "local")
    try:
        stack.wait_ready(rt, gpus=2)
        yield client
    finally:
        client.close()
        rt.close()
        stack.stop()


def _group(client: Client, job_id: int) -> int | None:
    backend_id = client.job(job_id).row()["backend_id"]
    pgid = Path(f"{backend_id}.pgid") if backend_id else None
    return int(pgid.read_text()) if pgid is not None and pgid.exists() else None


def test_cancel_of_a_batch_job_stops_it_without_waiting_for_a_periodic_sync(no_beat):
    client = no_beat
    # Given a job on the process backend, submitted by the submit's own nudge
    job = client.submit("sleep 600", backend="process", gpus=0)
    pgid = until(lambda: _group(client, job.id), timeout_s=60)
    assert group_exists(pgid)
    # When it is cancelled, with no beat to run the backend's sync later
    assert client.call("cancel", ids=[job.id])["cancelling"] == [job.id]
    # Then the cancel's own nudge stopped its process group at the backend
    until(lambda: not group_exists(pgid), timeout_s=60)
