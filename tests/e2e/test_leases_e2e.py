"""The hard faults a shared GPU host meets, each injected into a real stack under a running
mix of GPU and 0-GPU jobs that record their own spans (tests/support/spans.py). After each: no two
runs of a job overlapped, no GPU was double-booked, no attempt ran twice, and every job
ended or runs again under its restart policy.

The stack's lease is short (8 s: a worker that cannot renew stops its job after 5 s; the
reconciler settles an attempt 2 s after its lease ran out), so each outage below outlasts
it. Redis is a private `redis-server` without persistence, so killing it loses its data.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import col, select

from app.client import Client
from app.core.keys import gpu_queue
from app.core.settings import Settings
from app.runtime import Runtime
from app.store.models import Job
from tests.support.faultkit import database_away, proxied_database, wait_ended
from tests.support.netutil import PausableProxy, free_port
from tests.support.servers import Stack, processes_with, until
from tests.support.spans import check, read_spans, span_command

pytestmark = pytest.mark.e2e

LEASE_S = 8


class PrivateRedis:
    """A redis-server of the test's own, without persistence: SIGKILL loses everything."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        until(self._answers, timeout_s=20)

    def _answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class LeasedStack(Stack):
    def __init__(self, settings: Settings, redis_server: PrivateRedis,
                 db_proxy: PausableProxy | None) -> None:
        super().__init__(settings, settings.home)
        self.redis_server = redis_server
        self.db_proxy = db_proxy

    def kill(self, marker: str) -> None:
        """SIGKILL the Celery worker whose command line holds `marker` (`cpu@host`)."""
        pids = processes_with(marker)
        assert pids, f"no process with {marker}"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def leased(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeasedStack]:
    home = tmp_path_factory.mktemp("leases-home")
    server = PrivateRedis(home)
    server.start()
    settings = Settings(home=home, redis_url=server.url, hostname="e2e-leases", fake_gpus=2,
                        cpu_slots=2, kill_grace_s=1, heartbeat_s=1, monitor_interval_s=0.5,
                        reservation_ttl_s=LEASE_S, lease_margin_s=2, reconcile_interval_s=1,
                        dispatch_interval_s=1, database_retry_s=10, op_timeout_s=5,
                        consumer_stall_s=10,
                        preflight_commands={"slow": f"sleep {LEASE_S + 6}"}, _env_file=None)
    try:
        with proxied_database() as (proxy, database_url):
            settings = settings.model_copy(update={"database_url": database_url})
            with LeasedStack(settings, server, proxy).up(gpus=2) as stack:
                yield stack
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()


@pytest.fixture
def client(leased: LeasedStack) -> Iterator[Client]:
    c = Client(leased.settings, "local")
    yield c
    c.close()


def _attempts(settings: Settings, ids: list[int]) -> dict[int, int]:
    rt = Runtime(settings)
    try:
        with rt.session() as session:
            return {i: a for i, a in session.exec(
                select(Job.id, Job.attempt).where(col(Job.id).in_(ids))).all() if i is not None}
    finally:
        rt.close()


def _mix(client: Client, out: Path, tag: str, seconds: float = 3, **options) -> list[int]:
    """Two GPU jobs that take both GPUs, two 0-GPU jobs, and GPU jobs queued behind."""
    ids = [client.submit(span_command(out, seconds) + f" #{tag}-gpu{i}", gpus=1,
                         **options).id for i in range(2)]
    ids += [client.submit(span_command(out, seconds) + f" #{tag}-cpu{i}", gpus=0,
                          **options).id for i in range(2)]
    ids += [client.submit(span_command(out, 0.5) + f" #{tag}-behind{i}", gpus=1,
                          **options).id for i in range(4)]
    return ids


def _assert_invariants(leased: LeasedStack, out: Path, ids: list[int]) -> None:
    violations = check(read_spans(out), _attempts(leased.settings, ids))
    assert violations.ok, str(violations)


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie waiting to be reaped."""
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False


def _running(client: Client, ids: list[int], count: int) -> bool:
    return sum(r["status"] == "RUNNING" for r in client.rows(ids)) >= count


@pytest.mark.timeout(300)
def test_a_preflight_longer_than_the_lease_runs_once_and_is_not_cancelled(leased, client,
                                                                          tmp_path: Path):
    out = tmp_path / "spans"
    job = client.submit(span_command(out, 1), gpus=1, preflight="slow", name="slow-preflight")
    rows = wait_ended(client, [job.id], timeout_s=120)
    assert rows[0]["status"] == "SUCCEEDED", rows[0]
    events = client.call("job", job_id=job.id)["events"]
    moves = [(e["from"], e["to"]) for e in events if e["from"] != e["to"]]
    assert moves == [(None, "PENDING"), ("PENDING", "STARTING"), ("STARTING", "RUNNING"),
                     ("RUNNING", "SUCCEEDED")], events
    assert len(read_spans(out)) == 1
    _assert_invariants(leased, out, [job.id])


@pytest.mark.timeout(300)
def test_every_hold_deleted_mid_run_double_books_nothing(leased, client, tmp_path: Path):
    out = tmp_path / "spans"
    ids = _mix(client, out, "holds-lost", seconds=6)
    until(lambda: _running(client, ids, 3), timeout_s=90)
    rt = Runtime(leased.settings)
    try:
        for key in rt.redis.scan_iter("gpuq:hold:*"):
            rt.redis.delete(key)
        rt.redis.set("gpuq:dispatch:dirty", 1)  # and a pass runs at once
    finally:
        rt.close()
    rows = wait_ended(client, ids, timeout_s=180)
    assert Counter(r["status"] for r in rows) == {"SUCCEEDED": len(ids)}, rows
    _assert_invariants(leased, out, ids)


@pytest.mark.timeout(400)
def test_the_database_away_past_the_lease_and_the_retry_budget_runs_nothing_twice(
        leased, client, tmp_path: Path):
    out = tmp_path / "spans"
    short = client.submit(span_command(out, 2) + " #short", gpus=1, name="db-short")
    long = client.submit(span_command(out, 60) + " #long", gpus=1, max_restarts=1,
                         name="db-long")
    until(lambda: _running(client, [short.id, long.id], 2), timeout_s=180)
    # Past the retry budget (10 s), the lease (8 s) and SQLite's 30 s busy timeout
    database_away(leased.settings.home, leased.db_proxy, 35)
    rows = wait_ended(client, [short.id], timeout_s=120)
    # The short job ended during the outage: its outcome was kept and recorded after it
    assert rows[0]["status"] == "SUCCEEDED", rows[0]
    # The long one could not renew its lease: its worker stopped it, then it ran again
    until(lambda: long.row()["restart_count"] == 1 and long.status == "RUNNING",
          timeout_s=120)
    long.cancel()
    wait_ended(client, [long.id], timeout_s=60)
    _assert_invariants(leased, out, [short.id, long.id])


@pytest.mark.timeout(300)
def test_the_cpu_worker_killed_under_a_0_gpu_job_stops_it_and_runs_it_again(
        leased, client, tmp_path: Path):
    out = tmp_path / "spans"
    job = client.submit(span_command(out, 5) + " #cpu-killed", gpus=0, max_restarts=1,
                        name="cpu-killed")
    until(lambda: job.status == "RUNNING", timeout_s=60)
    rt = Runtime(leased.settings)
    try:
        with rt.session() as session:
            pid = session.get(Job, job.id).pid
    finally:
        rt.close()
    assert pid
    leased.kill(f"cpu@{leased.settings.hostname}")
    rows = wait_ended(client, [job.id], timeout_s=180)
    assert rows[0]["status"] == "SUCCEEDED" and rows[0]["restart_count"] == 1, rows[0]
    assert not _alive(pid), f"the first run's process {pid} outlived its worker"
    assert len(read_spans(out)) == 2
    _assert_invariants(leased, out, [job.id])


def test_a_restart_waits_for_its_backoff(leased, client, tmp_path: Path):
    marker = tmp_path / "tries"
    job = client.submit(f"echo x >> {marker}; exit 7", gpus=1, recover_exit_codes=[7],
                        name="backoff")
    until(lambda: marker.exists() and len(marker.read_text().split()) >= 3, timeout_s=60)
    job.cancel()
    events = [e for e in client.call("job", job_id=job.id)["events"]
              if e["to"] == "STARTING" and e["from"] != "STARTING"]
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(events)]
    # 1 s after the first attempt, 2 s after the second: never at once
    assert gaps[0] >= 1 and gaps[1] >= 2, gaps


def _every_gpu_takes_work(client: Client, out: Path, tag: str) -> None:
    """One job pinned to each GPU of the stack runs: no GPU left service for good."""
    ids = [client.submit(span_command(out, 0.2) + f" #{tag}-gpu{g}", gpus=1,
                         allowed_gpu_ids=[g]).id for g in range(2)]
    rows = wait_ended(client, ids, timeout_s=180)
    assert [r["status"] for r in rows] == ["SUCCEEDED", "SUCCEEDED"], rows


@pytest.mark.timeout(300)
def test_a_worker_whose_consumer_stops_taking_messages_is_started_anew(leased, client,
                                                                       tmp_path: Path):
    """The symptom of Celery's wedged consumer, made on purpose: GPU 1's worker stays up,
    its heartbeat announces GPU 1, but it takes nothing from its queue any more."""
    rt = Runtime(leased.settings)
    try:
        queue = gpu_queue(leased.settings.hostname, 1)
        replies = rt.celery.control.cancel_consumer(
            queue, destination=[f"gpu1@{leased.settings.hostname}"], reply=True, timeout=10)
        assert replies, "the worker of GPU 1 did not answer"
        pid_before = processes_with(f"gpu1@{leased.settings.hostname}")
        _every_gpu_takes_work(client, tmp_path / "spans", "wedged")
        assert processes_with(f"gpu1@{leased.settings.hostname}") != pid_before
    finally:
        rt.close()


# Redis lost last: what it takes down is what the tests above do not need.
@pytest.mark.timeout(400)
@pytest.mark.parametrize(("job_s", "away_s"), [
    # every hold, heartbeat, queue and inventory key lost while the jobs run
    pytest.param(6, 3, id="redis-killed-with-its-data-lost-double-books-nothing"),
    # the jobs end while it is away; their leases and outcomes live in the database
    pytest.param(4, LEASE_S + 4, id="a-broker-outage-longer-than-the-lease-loses-nothing"),
])
def test_redis_killed_mid_run(leased, client, tmp_path: Path, job_s: float, away_s: float):
    out = tmp_path / "spans"
    ids = _mix(client, out, "redis-lost", seconds=job_s)
    until(lambda: _running(client, ids, 3), timeout_s=90)
    leased.redis_server.kill()
    time.sleep(away_s)
    leased.redis_server.start()
    rows = wait_ended(client, ids, timeout_s=240)
    assert Counter(r["status"] for r in rows) == {"SUCCEEDED": len(ids)}, rows
    _assert_invariants(leased, out, ids)
    _every_gpu_takes_work(client, out, "after")


@pytest.mark.timeout(400)
def test_redis_lost_again_while_workers_reconnect_leaves_every_gpu_in_service(
        leased, client, tmp_path: Path):
    """Celery's Redis consumer can come back from quick successive outages connected but
    consuming nothing; each worker's watch must notice and start it anew."""
    out = tmp_path / "spans"
    for pause in (0.2, 0.5, 0.3, 1.0, 0.2):
        leased.redis_server.kill()
        time.sleep(pause)
        leased.redis_server.start()
        time.sleep(pause)
    _every_gpu_takes_work(client, out, "flapped")
    ids = [client.submit(span_command(out, 0.2) + f" #flapped-cpu{i}", gpus=0).id
           for i in range(2)]
    rows = wait_ended(client, ids, timeout_s=180)
    assert Counter(r["status"] for r in rows) == {"SUCCEEDED": 2}, rows
