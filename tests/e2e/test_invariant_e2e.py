"""Invariant 1 under load: hundreds of 1-, 2- and 4-GPU jobs on two simulated hosts of four
fake GPUs each (separate worker processes, one Redis, one database). No GPU is ever held
by two jobs, and every job's GPUs are on one host."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.client import Client
from app.core.settings import Settings
from app.runtime import Runtime
from tests.support.servers import EXTERNAL_DB, Stack, clean_servers

pytestmark = pytest.mark.e2e
HOSTS = ("hosta", "hostb")
JOBS = 240


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory, redis_url: str
              ) -> Iterator[Settings]:
    clean_servers(redis_url)
    home = tmp_path_factory.mktemp("two-hosts")
    base = Settings(home=home, redis_url=redis_url, database_url=EXTERNAL_DB, fake_gpus=4,
                    heartbeat_s=1, cpu_slots=0, hostname="client", _env_file=None)
    stacks = [Stack(base.model_copy(update={"hostname": host}), home) for host in HOSTS]
    for stack, host in zip(stacks, HOSTS, strict=True):
        stack.start("worker")
        (home / "worker.log").rename(home / f"worker-{host}.log")
    rt = Runtime(base)
    try:
        stacks[0].wait_ready(rt, gpus=8, control=False)
        yield base
    finally:
        rt.close()
        for stack in stacks:
            stack.stop()


@pytest.mark.timeout(420)  # its own bound: the 300 s wait below
def test_no_gpu_is_ever_held_by_two_jobs_across_two_hosts(two_hosts: Settings, tmp_path: Path):
    spans = tmp_path / "spans"
    spans.mkdir()
    record = (f"s=$(date +%s.%N); sleep 0.$((RANDOM % 3)); e=$(date +%s.%N); "
              f"echo $GPUQ_HOST $CUDA_VISIBLE_DEVICES $s $e > {spans}/$GPUQ_JOB_ID")
    rng = random.Random(7)
    client = Client(two_hosts)
    try:
        wanted = {client.submit(["bash", "-c", record], gpus=k, allow_duplicate=True).id: k
                  for k in (rng.choice((1, 2, 4)) for _ in range(JOBS))}
        rows = client.wait(list(wanted), timeout_s=300)
    finally:
        client.close()
    assert {r["status"] for r in rows} == {"SUCCEEDED"}

    held: dict[tuple[str, int], list[tuple[float, float, int]]] = {}
    for row in rows:
        host, gpus, start, end = (spans / str(row["id"])).read_text().split()
        gpu_ids = [int(g) for g in gpus.split(",")]
        assert host == row["host"] and gpu_ids == row["gpu_ids"], "the job ran where recorded"
        assert len(gpu_ids) == wanted[row["id"]], "k GPUs, all on this one host"
        for gpu in gpu_ids:
            held.setdefault((host, gpu), []).append((float(start), float(end), row["id"]))
    assert {host for host, _ in held} == set(HOSTS), "work spread over both hosts"
    for gpu, intervals in held.items():
        intervals.sort()
        for (_, end, first), (start, _, second) in itertools.pairwise(intervals):
            assert start >= end, f"{gpu}: jobs {first} and {second} overlap"
