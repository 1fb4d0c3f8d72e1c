"""Shared set-up for the benchmarks: a private home, the embedded Redis, SQLite, and real
worker processes, all started here and stopped at the end."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from app.client import Client
from app.core.procgroup import stop_groups
from app.core.settings import Settings
from app.store.embedded_redis import EmbeddedRedis

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Bench:
    settings: Settings
    client: Client
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUQ_")}
        env.update(self.settings.as_environment(), PATH=f"{BIN}:{os.environ['PATH']}",
                   PYTHONPATH=str(ROOT))
        env.update(extra)
        return env

    def start(self, *argv: str, **extra_env: str) -> None:
        log = open(self.settings.home / f"{Path(argv[0]).name}-{len(self.procs)}.log", "wb")  # noqa: SIM115 (handed to the child)
        self.procs.append(subprocess.Popen(list(argv), env=self.env(**extra_env), stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))
        log.close()

    def wait_gpus(self, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            hosts = self.client.call("status")["hosts"]
            if sum(h["workers_alive"] for h in hosts) >= count:
                return
            time.sleep(0.2)
        raise RuntimeError("GPU workers did not come up")


def stop_cleanly_on_sigterm() -> None:
    """SIGTERM (a `timeout`, a CI runner) unwinds like Ctrl-C, so that the servers and
    workers a benchmark started are stopped by its `finally`, not left running."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


@contextmanager
def bench_stack(gpus: int = 0, control: bool = False,
                prepare: Callable[[Bench], None] | None = None) -> Iterator[Bench]:
    """A private stack: embedded Redis and SQLite, `gpus` fake GPUs with their workers.

    `prepare` runs once Redis is up and before any worker starts: it may fill the database
    (`bench.client.rt.engine` creates it under the stack's home) or Redis."""
    stop_cleanly_on_sigterm()
    home = Path(tempfile.mkdtemp(prefix="gpuq-bench-"))
    settings = Settings(home=home, fake_gpus=gpus, cpu_slots=0, hostname="bench",
                        log_level="ERROR", _env_file=None)
    server = EmbeddedRedis(settings)
    settings = settings.model_copy(update={"redis_url": server.start()})
    bench = Bench(settings, Client(settings))
    try:
        if prepare is not None:
            prepare(bench)
        if gpus:
            bench.start(str(BIN / "gpuq"), "worker")
            bench.wait_gpus(gpus)
        if control:
            bench.start(str(BIN / "gpuq"), "control-worker")
            time.sleep(3)
        yield bench
    finally:
        bench.client.close()
        stop_groups(bench.procs, grace_s=30)
        server.stop()


def median_time(fn: Callable[[], object], runs: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name: str, figure: str, target: str, baseline: str, ratio: float,
           met: bool, ratio_means: str = "faster than the baseline", digits: int = 1) -> None:
    """One headline line; `digits` of the ratio (2 where a target is a ratio near 1)."""
    verdict = "meets target" if met else "MISSES target"
    print(f"{name}: {figure} (target {target}, {verdict}); baseline: {baseline}; "
          f"ratio {ratio:.{digits}f}x {ratio_means}", flush=True)


def used_memory(bench: Bench) -> int:
    return int(bench.client.rt.redis.info("memory")["used_memory"])
