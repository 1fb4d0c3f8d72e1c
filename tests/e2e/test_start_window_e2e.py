"""The database lost right after a job's process started, before its RUNNING record: the
lease still fences the job. Its worker stops it before the lease runs out, and only then is
it run again: never two copies, never a copy past its lease.

Real processes: `gpuq worker`, `gpuq control-worker` and `gpuq beat` on SQLite with a short
lease (8 s: a worker that cannot renew stops its job after 5 s; the reconciler requeues 2 s
after the lease ran out), and the database taken away by another process holding its write
lock (BEGIN EXCLUSIVE) for longer than the lease.

The outage must begin inside the start window, after the worker claimed the attempt and
before it records the start, a window of microseconds. The test makes it a wait it can see:
the job's log is a FIFO whose buffer the test filled, so the worker, which writes the
attempt's first line there just before it starts the process, blocks on that write with the
log open. The test sees the open file in /proc, takes the lock, then drains the FIFO: the
worker writes, starts the process, and meets the outage as it records the start.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.client import Client
from app.core.paths import JobPaths
from app.core.settings import Settings
from app.runtime import Runtime
from app.store.models import Job
from tests.support.faultkit import wait_ended
from tests.support.servers import Stack, until
from tests.support.spans import check, read_spans, span_command

pytestmark = pytest.mark.e2e

LEASE_S = 8
OUTAGE_S = 15  # past the lease and its margin, within SQLite's 30 s busy timeout

HOLD_THE_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print(time.time(), flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


@pytest.fixture
def stack(tmp_path: Path, redis_url: str) -> Iterator[Stack]:
    with contextlib.closing(redis.Redis.from_url(redis_url)) as r:
        r.flushdb()
    settings = Settings(home=tmp_path / "home", redis_url=redis_url, database_url=None,
                        hostname="start-window", fake_gpus=2, cpu_slots=0, kill_grace_s=1,
                        heartbeat_s=1, reservation_ttl_s=LEASE_S, lease_margin_s=2,
                        reconcile_interval_s=1, dispatch_interval_s=1, _env_file=None)
    with Stack(settings, tmp_path).up(gpus=2) as running:
        yield running


def attempts(settings: Settings, job_id: int) -> int:
    rt = Runtime(settings)
    try:
        with rt.session() as session:
            found = session.get(Job, job_id)
            assert found is not None
            return found.attempt
    finally:
        rt.close()


class FullFifo:
    """A FIFO whose buffer is full: whoever opens it to write may open it, and then blocks
    on its first write until `drain()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path, 0o600)
        self.reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(writer, b"x" * 4096)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(writer, b"x")
        os.close(writer)
        self._stop = threading.Event()
        self._drainer = threading.Thread(target=self._drain, daemon=True)

    def held_open_by_another(self) -> bool:
        """Another process has the FIFO open (the worker, stuck on its write)."""
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                for fd in (proc / "fd").iterdir():
                    with contextlib.suppress(OSError):
                        if os.readlink(fd) == str(self.path):
                            return True
        return False

    def drain(self) -> None:
        self._drainer.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.reader], [], [], 0.1)
            if ready:
                try:
                    if not os.read(self.reader, 65536):
                        self._stop.wait(0.1)  # no writer now; one may open it again
                except BlockingIOError:
                    pass

    def close(self) -> None:
        self._stop.set()
        if self._drainer.is_alive():
            self._drainer.join()
        os.close(self.reader)


@pytest.mark.timeout(300)
def test_the_database_lost_in_the_start_window_never_runs_the_job_twice(stack, tmp_path):
    out = tmp_path / "spans"
    go, first = tmp_path / "go", tmp_path / "first-run"
    client = Client(stack.settings, "local")
    try:
        gate = client.submit(f"while [ ! -e {go} ]; do sleep 0.1; done", gpus=1, name="gate")
        # Its first run would outlive the lease; a run after it is short.
        job = client.submit(
            f"if [ -e {first} ]; then {span_command(out, 1)}; "
            f"else touch {first}; {span_command(out, 30)}; fi",
            gpus=1, after=[gate.id], name="start-window")
        fifo = FullFifo(JobPaths(stack.settings.home, job.id).log)
        try:
            go.touch()
            until(fifo.held_open_by_another, timeout_s=60,
                  describe=lambda: f"the job is {job.status}")
            with subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK,
                                   str(stack.settings.home / "gpuq.db"), str(OUTAGE_S)],
                                  stdout=subprocess.PIPE, text=True) as holder:
                assert holder.stdout is not None
                locked_at = float(holder.stdout.readline())
                fifo.drain()
                holder.wait(timeout=OUTAGE_S + 30)
            rows = wait_ended(client, [job.id, gate.id], timeout_s=150)
        finally:
            stack.stop()
            fifo.close()

        runs = sorted(read_spans(out), key=lambda s: s.start)
        # Its last renewal came before the lock: its lease ran out LEASE_S after at most.
        assert runs[0].end < locked_at + LEASE_S, (
            f"the first run went on {runs[0].end - locked_at:.1f}s into the outage, past "
            f"its {LEASE_S}s lease")
        violations = check(runs, {job.id: attempts(stack.settings, job.id)})
        assert violations.ok, str(violations)
        events = client.call("job", job_id=job.id)["events"]
        assert [r["status"] for r in rows] == ["SUCCEEDED", "SUCCEEDED"], (rows, events)
        assert len(runs) == 2, runs
        moves = [(e["from"], e["to"]) for e in events if e["from"] != e["to"]]
        assert moves == [(None, "PENDING"), ("PENDING", "STARTING"), ("STARTING", "PENDING"),
                         ("PENDING", "STARTING"), ("STARTING", "RUNNING"),
                         ("RUNNING", "SUCCEEDED")], moves
    finally:
        client.close()
