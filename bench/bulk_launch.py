"""Bulk launch: 10,000 replicas of one function with a 1 MB argument.

Figure: the client call's time (all replicas PENDING when it returns) and Redis growth.
Baseline, same run: a plain Celery group of 10,000 signatures carrying a 100 KB payload
inline (1 MB inline would need 10 GB of Redis).
"""

from __future__ import annotations

import os
import time

from celery import group

from bench.harness import bench_stack, median_time, report, used_memory

REPLICAS = 10_000
PAYLOAD = os.urandom(1 << 20)  # random: gzip cannot shrink it
BASELINE_PAYLOAD = os.urandom(100 * 1024).hex()[: 100 * 1024]


def train(data: bytes) -> int:
    return len(data) + int(os.environ["GPUQ_JOB_RANK"])


def main() -> None:
    with bench_stack() as bench:
        client = bench.client
        client.launch(train, REPLICAS // 10, PAYLOAD)  # warm-up: tables, connections
        growth: list[int] = []

        def one_launch() -> None:
            before = used_memory(bench)
            handle = client.launch(train, REPLICAS, PAYLOAD)
            growth.append(used_memory(bench) - before)
            assert handle.counts() == {"PENDING": REPLICAS}

        seconds = median_time(one_launch, runs=3, warmup=0)
        # used_memory moves with Redis's own buffers too: average over the launches.
        mean_growth = sum(growth) / len(growth)
        per_replica = max(0.0, mean_growth - len(PAYLOAD)) / REPLICAS

        from bench.plain_celery import app as plain

        plain.conf.broker_url = bench.settings.redis_url
        before = used_memory(bench)
        start = time.perf_counter()
        group(plain.signature("plain.carry", args=(BASELINE_PAYLOAD,), queue="plain-bulk")
              for _ in range(REPLICAS)).apply_async()
        baseline_s = time.perf_counter() - start
        baseline_bytes = used_memory(bench) - before
        bench.client.rt.redis.delete("plain-bulk")

    report("bulk launch 10,000 x 1 MB",
           f"{seconds:.3f} s per call, Redis +{mean_growth / 2**20:.2f} MiB "
           f"({per_replica:.0f} B per replica beyond the payload)",
           "<= 1 s, <= payload + 1 KB per replica",
           f"plain Celery group, 100 KB inline: {baseline_s:.2f} s, "
           f"Redis +{baseline_bytes / 2**20:.0f} MiB",
           baseline_s / seconds, seconds <= 1.0 and per_replica <= 1024)


if __name__ == "__main__":
    main()
