"""Throughput: 2,000 `true` jobs on 8 fake GPUs, end to end to SUCCEEDED.

Baseline, same run and machine: plain Celery tasks that each run `true` in a subprocess,
on 8 worker processes, with no allocation, no database and no job records.
"""

from __future__ import annotations

import time

from bench.harness import BIN, bench_stack, report

JOBS = 2_000
GPUS = 8


def gpuq_rate(bench, jobs: int = JOBS, **options: object) -> float:  # type: ignore[no-untyped-def]
    """`options` go to both launches (the warm-up's and the measured), e.g. a priority."""
    client = bench.client
    client.launch("true", num_jobs=100, **options).wait(timeout_s=120)  # warm-up
    start = time.perf_counter()
    handle = client.launch("true", num_jobs=jobs, **options)
    rows = handle.wait(timeout_s=600)
    seconds = time.perf_counter() - start
    assert {r["status"] for r in rows} == {"SUCCEEDED"}, "every job succeeded"
    return jobs / seconds


def plain_rate(bench, jobs: int = JOBS) -> float:  # type: ignore[no-untyped-def]
    from bench.plain_celery import app as plain

    plain.conf.broker_url = bench.settings.redis_url
    bench.start(str(BIN / "celery"), "-A", "bench.plain_celery", "worker", "-P", "prefork",
                "-c", str(GPUS), "-Q", "plain", "-l", "ERROR", "--without-gossip",
                "--without-mingle", BENCH_BROKER=bench.settings.redis_url)
    r = bench.client.rt.redis
    r.delete("bench:plain:done")
    plain.send_task("plain.run_true", queue="plain")
    while not r.get("bench:plain:done"):  # the workers are up
        time.sleep(0.1)
    r.delete("bench:plain:done")
    start = time.perf_counter()
    with plain.producer_or_acquire() as producer:
        for _ in range(jobs):
            plain.send_task("plain.run_true", queue="plain", producer=producer)
    while int(r.get("bench:plain:done") or 0) < jobs:
        time.sleep(0.05)
    return jobs / (time.perf_counter() - start)


def main() -> None:
    with bench_stack(gpus=GPUS) as bench:
        ours = gpuq_rate(bench)
        baseline = plain_rate(bench)
    report(f"throughput {JOBS} true jobs, {GPUS} fake GPUs", f"{ours:.0f} jobs/s",
           ">= 200 jobs/s", f"plain Celery + subprocess, 8 processes: {baseline:.0f} jobs/s",
           ours / baseline, ours >= 200, ratio_means="the baseline's rate")


if __name__ == "__main__":
    main()
