"""Cancel 10,000 pending replicas of one launch.

Baseline, same run: cancelling replicas one by one (one operation per job), measured on
1,000 and scaled to 10,000.
"""

from __future__ import annotations

import time

from bench.harness import bench_stack, median_time, report

REPLICAS = 10_000
ONE_BY_ONE_SAMPLE = 1_000


def main() -> None:
    with bench_stack() as bench:
        client = bench.client

        def cancel_launch() -> None:
            handle = client.launch("sleep 600", num_jobs=REPLICAS)
            start = time.perf_counter()
            out = handle.cancel()
            times.append(time.perf_counter() - start)
            assert len(out["cancelled"]) == REPLICAS

        times: list[float] = []
        median_time(cancel_launch, runs=3)
        seconds = sorted(times)[len(times) // 2]

        handle = client.launch("sleep 600", num_jobs=ONE_BY_ONE_SAMPLE)
        start = time.perf_counter()
        for job_id in handle.job_ids:
            client.call("cancel", ids=[job_id])
        one_by_one = (time.perf_counter() - start) * REPLICAS / ONE_BY_ONE_SAMPLE
    report("cancel 10,000 pending replicas", f"{seconds:.3f} s", "<= 1 s",
           f"one by one: {one_by_one:.1f} s (scaled from {ONE_BY_ONE_SAMPLE:,})",
           one_by_one / seconds, seconds <= 1.0)


if __name__ == "__main__":
    main()
