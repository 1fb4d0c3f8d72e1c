"""Redis high availability: a real stack on a `sentinel://` GPUQ_REDIS_URL (a redis-server
primary and replica watched by three sentinels, all private to this module) survives the
primary's SIGKILL: the sentinels promote the replica, clients and workers follow it, and
every job submitted before and after runs exactly once."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.client import Client
from app.core.sentinel import SentinelUrl
from app.core.settings import Settings, mask_url
from tests.support.netutil import free_port
from tests.support.servers import EXTERNAL_DB, IN_CI, Stack, _reset_database, missing, until

pytestmark = pytest.mark.e2e

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
MASTER = "gpuq-primary"


class RedisSet:
    """A primary, a replica and three sentinels on 127.0.0.1, each in a directory of its
    own under `root`, with no persistence (a killed primary's data is gone)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.primary_port = free_port("127.0.0.1")
        self.replica_port = free_port("127.0.0.1")
        self.sentinel_ports = [free_port("127.0.0.1") for _ in range(3)]

    def _run(self, name: str, *args: str) -> None:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        log = open(folder / "log", "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen([REDIS_SERVER, *args], cwd=folder, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def start(self) -> None:
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._run("primary", "--port", str(self.primary_port), *common)
        self._run("replica", "--port", str(self.replica_port), *common,
                  "--replicaof", "127.0.0.1", str(self.primary_port))
        for n, port in enumerate(self.sentinel_ports):
            folder = self.root / f"sentinel{n}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"  # a sentinel rewrites its own file: one each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 5000\n"
                f"sentinel parallel-syncs {MASTER} 1\n")
            self._run(f"sentinel{n}", str(conf), "--sentinel")
        until(self._replicating, timeout_s=60)

    def _replicating(self) -> bool:
        """The replica is in sync and every sentinel knows it and its peers."""
        try:
            replica = redis.Redis(port=self.replica_port, socket_timeout=1)
            with contextlib.closing(replica):
                if replica.info("replication").get("master_link_status") != "up":
                    return False
            for port in self.sentinel_ports:
                s = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
                with contextlib.closing(s):
                    master = s.sentinel_master(MASTER)
                    if master["num-slaves"] < 1 or master["num-other-sentinels"] < 2:
                        return False
        except (redis.RedisError, OSError):
            return False
        return True

    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"sentinel://{hosts}/0?master={MASTER}"

    def primary_address(self) -> tuple[str, int] | None:
        for port in self.sentinel_ports:
            s = redis.Redis(port=port, socket_timeout=1)
            with contextlib.closing(s), contextlib.suppress(redis.RedisError, OSError):
                host, found = s.sentinel_get_master_addr_by_name(MASTER)
                return (host.decode() if isinstance(host, bytes) else host, int(found))
        return None

    def kill_primary(self) -> None:
        proc = self.procs.pop("primary")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def redis_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSet]:
    if not os.path.exists(REDIS_SERVER):
        if IN_CI:
            raise AssertionError("redis-server is needed for the Sentinel test")
        missing("no redis-server here")
    servers = RedisSet(tmp_path_factory.mktemp("sentinel-redis"))
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="module")
def ha_stack(redis_set: RedisSet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("sentinel-home")
    if EXTERNAL_DB:
        _reset_database(EXTERNAL_DB)
    settings = Settings(home=home, redis_url=redis_set.url(), database_url=EXTERNAL_DB,
                        hostname="e2e-sentinel", fake_gpus=2, kill_grace_s=1, heartbeat_s=1,
                        monitor_interval_s=0.5, cpu_slots=2, reconcile_interval_s=2,
                        secret="the sentinel stack's secret", _env_file=None)
    with Stack(settings, home).up(gpus=2) as stack:
        yield stack


def _runs(out: Path) -> Counter[int]:
    return Counter(int(line) for line in out.read_text().split()) if out.exists() else Counter()


def _all_ended(client: Client, ids: list[int]) -> list[dict] | None:
    rows = client.rows(ids)
    done = {"SUCCEEDED", "FAILED", "CANCELLED", "FAILED_PRECHECK", "FAILED_NO_RESOURCE"}
    return rows if all(r["status"] in done for r in rows) else None


def _unended(client: Client, ids: list[int]) -> list[dict]:
    done = {"SUCCEEDED", "FAILED", "CANCELLED", "FAILED_PRECHECK", "FAILED_NO_RESOURCE"}
    return [{k: v for k, v in r.items() if k != "command"}
            for r in client.rows(ids) if r["status"] not in done]


def test_a_sentinel_url_names_its_master_and_sentinels():
    url = SentinelUrl.parse("sentinel://:pw@10.0.0.1:26379,[::1]:26380/3?master=main"
                            "&sentinel_password=spw")
    assert url == SentinelUrl(sentinels=(("10.0.0.1", 26379), ("::1", 26380)), master="main",
                              db=3, password="pw", sentinel_password="spw")
    assert url.kombu_url() == "sentinel://:pw@10.0.0.1:26379/3;sentinel://:pw@[::1]:26380/3"
    assert url.transport_options() == {"master_name": "main",
                                       "sentinel_kwargs": {"password": "spw"}}
    assert SentinelUrl.parse("redis://localhost:6379/0") is None
    assert mask_url("sentinel://:pw@h:1/0?master=m&sentinel_password=spw") == (
        "sentinel://:****@h:1/0?master=m&sentinel_password=****")
    with pytest.raises(ValueError, match="names its master"):
        Settings(redis_url="sentinel://h:1/0", _env_file=None)


# Generous: the failover itself (1 s to notice, an election, the promotion), the workers'
# reconnect backoff, and possibly a reservation TTL (60 s) for a message lost in the kill.
@pytest.mark.timeout(600)
def test_jobs_keep_flowing_through_a_primary_failover_none_lost_or_run_twice(
        redis_set: RedisSet, ha_stack: Stack, tmp_path: Path):
    out = tmp_path / "runs"
    command = f"echo $GPUQ_JOB_ID >> {out}; sleep 1"
    client = Client(ha_stack.settings, "local")
    try:
        before = [client.submit(f"{command} # gpu {i}", gpus=1, name=f"ha-{i}").id
                  for i in range(8)]
        before += [client.submit(f"{command} # cpu {i}", gpus=0, name=f"ha-cpu-{i}").id
                   for i in range(4)]
        until(lambda: len(_runs(out)) >= 2, timeout_s=60)  # jobs are running
        old = redis_set.primary_address()
        redis_set.kill_primary()
        ran_before = len(_runs(out))
        until(lambda: redis_set.primary_address() not in (None, old), timeout_s=60)
        # Jobs submitted after the failover run too, on the promoted replica
        after = [client.submit(f"{command} # after {i}", gpus=1, name=f"ha-after-{i}").id
                 for i in range(4)]
        ids = before + after
        rows = until(lambda: _all_ended(client, ids), timeout_s=400, poll_s=1,
                     describe=lambda: _unended(client, ids))
    finally:
        client.close()
    assert Counter(r["status"] for r in rows) == {"SUCCEEDED": len(ids)}
    runs = _runs(out)
    assert set(runs) == set(ids), "every job ran"
    assert max(runs.values()) == 1, f"ran twice: {[j for j, n in runs.items() if n > 1]}"
    assert redis_set.primary_address() == ("127.0.0.1", redis_set.replica_port)
    assert ran_before < len(before), "the primary died while jobs were still queued"
