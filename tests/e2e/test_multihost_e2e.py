"""Two GPU hosts on one machine: host A runs the control worker, beat and its GPU worker;
host B runs only its GPU worker, in a network namespace of its own with a veth pair
(10.77.0.2, reaching Redis and the database through 10.77.0.1) where this machine allows
it. Jobs spread over both; when host B dies its running jobs are restarted on A or LOST,
each per its restart budget, and the work waiting for GPUs runs on A."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import make_url
from sqlmodel import col, select

from app.client import Client
from app.core.settings import Settings
from app.runtime import Runtime
from app.store.models import Job
from tests.support.netutil import PausableProxy
from tests.support.servers import (
    EXTERNAL_DB,
    Stack,
    clean_servers,
    missing,
    processes_with,
    server_env,
    until,
)

pytestmark = pytest.mark.e2e
NS = f"gpuq-b{os.getpid()}"
HOST_ADDR, NS_ADDR = "10.77.0.1", "10.77.0.2"
VETH = f"gq{os.getpid() % 100000}"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def _remove_stale_namespaces() -> None:
    """Namespaces of earlier runs killed before their clean-up (their pytest is gone): their
    veth holds HOST_ADDR, and the routes to it would go astray."""
    for line in _ip("netns", "list").stdout.splitlines():
        found = re.match(r"gpuq-b(\d+)\b", line)
        if not found:
            continue
        pid = int(found.group(1))
        try:
            os.kill(pid, 0)
            continue  # its run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _ip("link", "del", f"gq{pid % 100000}h")
        _ip("netns", "del", f"gpuq-b{pid}")


@contextlib.contextmanager
def namespace() -> Iterator[str | None]:
    """A network namespace joined to this one by a veth pair; None where none can be made
    (not root, no iproute2, or a sandbox that forbids it)."""
    if os.geteuid() == 0 and shutil.which("ip"):
        _remove_stale_namespaces()
    if os.geteuid() != 0 or not shutil.which("ip") or _ip("netns", "add", NS).returncode:
        yield None
        return
    veth = VETH
    try:
        for args in (["link", "add", f"{veth}h", "type", "veth", "peer", "name", f"{veth}n"],
                     ["link", "set", f"{veth}n", "netns", NS],
                     ["addr", "add", f"{HOST_ADDR}/24", "dev", f"{veth}h"],
                     ["link", "set", f"{veth}h", "up"],
                     ["-n", NS, "addr", "add", f"{NS_ADDR}/24", "dev", f"{veth}n"],
                     ["-n", NS, "link", "set", f"{veth}n", "up"],
                     ["-n", NS, "link", "set", "lo", "up"]):
            done = _ip(*args)
            assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"
        yield NS
    finally:
        _ip("link", "del", f"{veth}h")
        _ip("netns", "del", NS)


class HostB(Stack):
    """Host B's GPU worker, inside the namespace when there is one."""

    def __init__(self, settings: Settings, log_dir: Path, ns: str | None) -> None:
        super().__init__(settings, log_dir)
        self.ns = ns

    def start_worker(self) -> None:
        gpuq = str(Path(sys.executable).parent / "gpuq")
        command = ["ip", "netns", "exec", self.ns, gpuq, "worker"] if self.ns else [gpuq,
                                                                                    "worker"]
        with open(self.log_dir / "worker-b.log", "ab") as log:
            self.procs.append(subprocess.Popen(
                command, env=server_env(self.settings), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.log_dir))

    def die(self) -> None:
        """The host goes away at once: its worker and every job process on it."""
        rt = Runtime(self.settings)
        with rt.session() as session:
            pids = session.exec(select(Job.pid).where(
                col(Job.host) == "hostb", col(Job.state) == "RUNNING")).all()
        rt.close()
        # Workers first, so that none lives to see its jobs die and record it.
        for pid in processes_with("@hostb") + [p.pid for p in self.procs]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.killpg(pid, signal.SIGKILL)  # type: ignore[arg-type]
        self.stop()
        self.procs.clear()

    def ready(self, rt: Runtime) -> bool:
        """Both of its GPU workers answer (alive keys alone come before consuming)."""
        replies = rt.celery.control.ping(timeout=0.5) or []
        return sum(name.endswith("@hostb") for reply in replies for name in reply) >= 2


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, redis_url: str
          ) -> Iterator[tuple[Settings, HostB]]:
    clean_servers(redis_url)
    home = tmp_path_factory.mktemp("two-hosts")
    # Short reservations: a dead host's jobs are settled within seconds.
    base = Settings(home=home, redis_url=redis_url, database_url=EXTERNAL_DB, fake_gpus=2,
                    heartbeat_s=1, reservation_ttl_s=6, lease_margin_s=2,
                    reconcile_interval_s=1, cpu_slots=0, kill_grace_s=1, hostname="hosta",
                    secret="two hosts' shared secret", _env_file=None)
    with namespace() as ns:
        proxies: list[PausableProxy] = []
        b_settings = base.model_copy(update={"hostname": "hostb"})
        if ns:
            # Host B reaches the servers at host A's address on the veth pair.
            redis_at = make_url(redis_url.replace("redis://", "postgresql://", 1))
            proxies.append(PausableProxy((redis_at.host or "", redis_at.port or 6379),
                                         HOST_ADDR))
            auth = f":{quote(redis_at.password, safe='')}@" if redis_at.password else ""
            changes = {"redis_url": f"redis://{auth}{HOST_ADDR}:{proxies[-1].port}/"
                                    f"{redis_at.database or 0}"}
            if EXTERNAL_DB:
                db = make_url(EXTERNAL_DB)
                proxies.append(PausableProxy((db.host or "", db.port or 5432), HOST_ADDR))
                changes["database_url"] = db.set(host=HOST_ADDR, port=proxies[-1].port
                                                 ).render_as_string(hide_password=False)
            b_settings = b_settings.model_copy(update=changes)
        host_a = Stack(base, home)
        host_a.start("worker", "control-worker", "beat")
        host_b = HostB(b_settings, home, ns)
        host_b.start_worker()
        rt = Runtime(base)
        try:
            host_a.wait_ready(rt, gpus=4)
            yield base, host_b
        finally:
            rt.close()
            host_b.stop()
            host_a.stop()
            for pid in processes_with("hostb"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for proxy in proxies:
                proxy.down()


def test_jobs_spread_over_both_hosts_each_on_its_own_address(hosts):
    settings, host_b = hosts
    client = Client(settings, "local")
    try:
        handle = client.launch("sleep 1; ip -o -4 addr show || true", num_jobs=8, gpus=1,
                               name="spread")
        rows = handle.wait(timeout_s=120)
        assert [r["status"] for r in rows] == ["SUCCEEDED"] * 8
        assert {r["host"] for r in rows} == {"hosta", "hostb"}
        for row in rows:
            log = client.call("logs", job_id=row["id"])["text"]
            if host_b.ns:  # host B's jobs see the namespace's address and A's do not
                assert (NS_ADDR in log) is (row["host"] == "hostb"), (row["host"], log)
    finally:
        client.close()


def test_a_dead_host_restarts_or_loses_its_jobs_and_waiting_work_runs_elsewhere(hosts):
    settings, host_b = hosts
    client = Client(settings, "local")
    try:
        # Host A's two GPUs busy until the test lets them go, then host B's two taken by
        # one job that may restart and one that may not.
        host_b.die()
        release = settings.home / "release-blockers"
        blockers = [client.submit(f"until [ -e {release} ]; do sleep 0.2; done #{i}", gpus=1,
                                  name=f"blocker-{i}") for i in range(2)]
        until(lambda: all(j.status == "RUNNING" for j in blockers), timeout_s=60)
        host_b.start_worker()
        until(lambda: host_b.ready(client.rt), timeout_s=60)
        again = client.submit("sleep 300 # may restart", gpus=1, max_restarts=1)
        once = client.submit("sleep 300 # may not", gpus=1, max_restarts=0)
        until(lambda: again.status == once.status == "RUNNING", timeout_s=60)
        assert {again.row()["host"], once.row()["host"]} == {"hostb"}
        waiting = [client.submit(f"true #{i}", gpus=1, name=f"waiting-{i}") for i in range(2)]
        release.touch()
        host_b.die()
        until(lambda: once.status == "LOST", timeout_s=60)
        assert once.row()["reason"] == "its worker died; no restart left"
        until(lambda: again.status == "RUNNING" and again.row()["host"] == "hosta",
              timeout_s=90)
        assert again.row()["restart_count"] == 1
        for job in waiting:
            until(lambda job=job: job.status == "SUCCEEDED", timeout_s=90)
            assert job.row()["host"] == "hosta"
        again.cancel()
        until(lambda: again.status == "CANCELLED", timeout_s=30)
    finally:
        client.close()


def test_a_host_cut_off_longer_than_its_lease_never_runs_a_job_twice(hosts):
    settings, host_b = hosts
    if host_b.ns is None:
        missing("no network namespace here (needs root and iproute2)")
    from tests.support.spans import check, read_spans, span_command

    client = Client(settings, "local")
    out = settings.home / "cut-spans"
    release = settings.home / "release-cut-blockers"
    try:
        # Host A's GPUs busy, so the job lands on host B
        blockers = [client.submit(f"until [ -e {release} ]; do sleep 0.2; done #cut{i}",
                                  gpus=1, name=f"cut-blocker-{i}") for i in range(2)]
        until(lambda: all(j.status == "RUNNING" for j in blockers), timeout_s=60)
        if not host_b.ready(client.rt):  # the test before left it dead
            host_b.start_worker()
        until(lambda: host_b.ready(client.rt), timeout_s=60)
        job = client.submit(span_command(out, 40) + " #cut", gpus=1, max_restarts=1,
                            name="cut-off")
        until(lambda: job.status == "RUNNING" and len(read_spans(out)) == 1, timeout_s=60)
        assert job.row()["host"] == "hostb"
        release.touch()
        # When host B's link goes down (its job untouched) for longer than lease + margin
        assert _ip("link", "set", f"{VETH}h", "down").returncode == 0
        try:
            if EXTERNAL_DB:  # B cannot renew its lease: it stops the job, which runs on A
                until(lambda: job.row()["host"] == "hosta" and job.status == "RUNNING",
                      timeout_s=90)
            else:  # B still reaches the SQLite file: its lease holds and the job stays
                import time

                time.sleep(settings.reservation_ttl_s + settings.lease_margin_s + 6)
                assert job.row()["host"] == "hostb" and job.status == "RUNNING"
        finally:
            assert _ip("link", "set", f"{VETH}h", "up").returncode == 0
        job.cancel()  # (it may have ended by itself meanwhile)
        until(lambda: job.status in ("CANCELLED", "SUCCEEDED"), timeout_s=120)
        with client.rt.session() as session:
            attempts = {job.id: session.get(Job, job.id).attempt}
        violations = check(read_spans(out), attempts)
        assert violations.ok, str(violations)
    finally:
        release.touch()
        client.close()
