"""Latency: submit -> process start with a free GPU, p50 and p99 over 500 jobs, with an
empty queue and again with 100,000 lower-priority jobs pending behind each submit (2-GPU
replicas pinned to GPUs 6 and 7 while a long job holds GPU 7: they never start).

The job's first act is to print the clock (`date +%s.%N`, started without a shell), so the
figure runs from the client's submit call to the moment the job's own process runs.
Baseline, same run: a plain Celery task sent to an idle worker, from send to task start.
"""

from __future__ import annotations

import time
from pathlib import Path

from app.core.paths import JobPaths
from bench.harness import BIN, Bench, bench_stack, report

JOBS = 500
WARMUP = 20
GPUS = 8
DEPTH = 100_000


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def _poll(predicate, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.002)
    raise TimeoutError("no answer in time")


def _stamp(log: Path) -> float | None:
    try:
        lines = log.read_text().split()
        return float(lines[-1]) if lines and "." in lines[-1] else None
    except (FileNotFoundError, ValueError):
        return None


def gpuq_latencies(bench: Bench, priority: int = 0) -> list[float]:
    client = bench.client
    samples = []
    for n in range(JOBS + WARMUP):
        start = time.time()
        job = client.submit("date +%s.%N", allow_duplicate=True, priority=priority)
        log = JobPaths(bench.settings.home, job.id).log
        stamp = _poll(lambda log=log: _stamp(log))
        _poll(lambda job=job: job.status == "SUCCEEDED")  # its GPU is free again
        if n >= WARMUP:
            samples.append(stamp - start)
    return samples


def plain_latencies(bench: Bench) -> list[float]:
    from bench.plain_celery import app as plain

    plain.conf.broker_url = bench.settings.redis_url
    bench.start(str(BIN / "celery"), "-A", "bench.plain_celery", "worker", "-P", "solo",
                "-Q", "plain-latency", "-l", "ERROR", "--without-gossip", "--without-mingle",
                BENCH_BROKER=bench.settings.redis_url)
    r = bench.client.rt.redis
    samples = []
    for n in range(JOBS + WARMUP):
        key = f"bench:latency:{n}"
        start = time.time()
        plain.send_task("plain.started", args=[key], queue="plain-latency")
        stamp = _poll(lambda key=key: r.lindex(key, 0), timeout_s=60)
        if n >= WARMUP:
            samples.append(float(stamp) - start)
    return samples


def pend_behind(bench: Bench, depth: int) -> None:
    """`depth` jobs that stay PENDING: they need GPUs 6 and 7, and GPU 7 is held."""
    blocker = bench.client.submit("sleep 3600", allowed_gpu_ids=[7], priority=5)
    _poll(lambda: blocker.status == "RUNNING", timeout_s=60)
    bench.client.launch("true", num_jobs=depth, gpus=2, allowed_gpu_ids=[6, 7], priority=0)


def main() -> None:
    with bench_stack(gpus=GPUS) as bench:
        ours = gpuq_latencies(bench)
        pend_behind(bench, DEPTH)
        deep = gpuq_latencies(bench, priority=1)
        baseline = plain_latencies(bench)
    p50, p99 = percentile(ours, 50) * 1000, percentile(ours, 99) * 1000
    b50, b99 = percentile(baseline, 50) * 1000, percentile(baseline, 99) * 1000
    report(f"submit -> process start, {JOBS} jobs, free GPU",
           f"p50 {p50:.1f} ms, p99 {p99:.1f} ms", "p50 <= 50 ms, p99 <= 250 ms",
           f"plain Celery send -> task start: p50 {b50:.1f} ms, p99 {b99:.1f} ms",
           p50 / b50, p50 <= 50 and p99 <= 250,
           ratio_means="the plain hop's p50 (allocation, records and a process start)")
    d50, d99 = percentile(deep, 50) * 1000, percentile(deep, 99) * 1000
    report(f"submit -> process start, {JOBS} high-priority jobs, {DEPTH:,} pending behind",
           f"p50 {d50:.1f} ms, p99 {d99:.1f} ms", "p50 <= 20 ms, p99 <= 100 ms",
           f"the same with an empty queue: p50 {p50:.1f} ms, p99 {p99:.1f} ms",
           d50 / p50, d50 <= 20 and d99 <= 100,
           ratio_means="the empty queue's p50 (1.0: depth costs nothing)")


if __name__ == "__main__":
    main()
