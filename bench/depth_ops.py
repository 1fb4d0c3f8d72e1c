"""Reads and bulk operations with a million jobs stored.

With `--stored` jobs (1,000,000: one launch, filled straight into the table, then counted
by `gpuq db recount`'s code) on SQLite and the embedded Redis:

- the reads a user and the dashboard make: `status`, `queue` (first page), `queue --status
  PENDING` and `launches`, in process (median of 20) and as `gpuq` processes (median of 3);
- `gpuq launch --num-jobs N -- true` as a process, N the most one launch takes (100,000),
  and what it grew the database and Redis by per replica;
- `gpuq cancel --launch` of those N pending replicas, as a process.

Baseline, same run: the same reads on an empty database (what depth costs), and for the
launch and cancel the same commands at N / 10 (how they scale).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import time
from collections.abc import Callable

from sqlalchemy import insert

from app.core.states import JobState
from app.store import counts
from app.store.jobs import MAX_JOBS_PER_LAUNCH
from app.store.models import Job, Launch
from bench.harness import BIN, Bench, bench_stack, median_time, report

FILL_BATCH = 50_000


def _fill(bench: Bench, stored: int) -> None:
    """One launch of `stored` PENDING replicas, as `gpuq launch` stores them."""
    rt, now = bench.client.rt, time.time()
    with rt.session() as session:
        launch = Launch(name="stored", num_jobs=stored, command="true", created_at=now)
        session.add(launch)
        session.flush()
        row = {"command": "true", "submitted_at": now, "env": {}, "recover_exit_codes": [],
               "state": JobState.PENDING.value, "priority": 0, "gpus": 1,
               "launch_id": launch.id, "num_jobs": stored}
        conn = session.connection()
        for start in range(0, stored, FILL_BATCH):
            conn.execute(insert(Job.__table__),  # type: ignore[attr-defined]
                         [{**row, "rank": start + i}
                          for i in range(min(FILL_BATCH, stored - start))])
        counts.recount(session)


def _as_process(bench: Bench, *argv: str, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([str(BIN / "gpuq"), *argv], env=bench.env(), check=True,
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


READS: dict[str, tuple[Callable[[Bench], object], list[str]]] = {
    "status": (lambda b: b.client.call("status"), ["status"]),
    "queue, first page": (lambda b: b.client.call("queue"), ["queue"]),
    "queue --status PENDING": (lambda b: b.client.call("queue", status="PENDING"),
                               ["queue", "--status", "PENDING"]),
    "launches": (lambda b: b.client.call("launches"), ["launches"]),
}


def _reads(bench: Bench) -> dict[str, tuple[float, float]]:
    return {name: (median_time(functools.partial(call, bench), runs=20), _as_process(bench, *argv))
            for name, (call, argv) in READS.items()}


def _growth(bench: Bench) -> int:
    """Bytes the database's pages in use (after a checkpoint) and Redis hold."""
    with bench.client.rt.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
        free = conn.exec_driver_sql("PRAGMA freelist_count").scalar_one()
        size = conn.exec_driver_sql("PRAGMA page_size").scalar_one()
    return (pages - free) * size + int(bench.client.rt.redis.info("memory")["used_memory"])


def _launch_and_cancel(bench: Bench, replicas: int) -> tuple[float, float, float]:
    """Seconds to launch, bytes per replica it added, seconds to cancel the launch."""
    before = _growth(bench)
    start = time.perf_counter()
    out = subprocess.run([str(BIN / "gpuq"), "launch", "--num-jobs", str(replicas), "--",
                          "sleep", "600"], env=bench.env(), check=True, capture_output=True,
                         text=True)
    launched = time.perf_counter() - start
    per_replica = (_growth(bench) - before) / replicas
    launch_id = bench.client.call("launches")["launches"][0]["id"]
    assert str(launch_id) in out.stdout, out.stdout
    start = time.perf_counter()
    subprocess.run([str(BIN / "gpuq"), "cancel", "--launch", str(launch_id)], env=bench.env(),
                   check=True, stdout=subprocess.DEVNULL)
    cancelled = time.perf_counter() - start
    row = bench.client.call("launches", launch_id=launch_id)["launches"][0]
    assert row["counts"] == {"CANCELLED": replicas}, row["counts"]
    return launched, per_replica, cancelled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stored", type=int, default=1_000_000)
    parser.add_argument("--replicas", type=int, default=MAX_JOBS_PER_LAUNCH)
    args = parser.parse_args()
    with bench_stack() as bench:
        empty = _reads(bench)
        small = _launch_and_cancel(bench, args.replicas // 10)
        start = time.perf_counter()
        _fill(bench, args.stored)
        filled_s = time.perf_counter() - start
        deep = _reads(bench)
        big = _launch_and_cancel(bench, args.replicas)
    stored = f"{args.stored:,} jobs stored (filled in {filled_s:.0f} s)"
    for name, (inproc, proc) in deep.items():
        e_in, e_proc = empty[name]
        target_in = 20 if name == "status" else 10
        report(f"{name}, {stored}", f"{inproc * 1000:.1f} ms in process, {proc:.2f} s as a "
               "process", f"<= {target_in} ms in process, <= 0.35 s as a process",
               f"empty database: {e_in * 1000:.1f} ms, {e_proc:.2f} s", inproc / e_in,
               inproc * 1000 <= target_in and proc <= 0.35,
               ratio_means="the empty database's time in process (1.0: depth costs nothing)")
    n, tenth = args.replicas, args.replicas // 10
    report(f"gpuq launch --num-jobs {n:,} as a process, {stored}",
           f"{big[0]:.2f} s, {big[1]:.0f} B per replica",
           "1,000,000 replicas in <= 3 s and <= 200 B per replica (one launch takes at most "
           f"{MAX_JOBS_PER_LAUNCH:,})", f"{tenth:,} replicas: {small[0]:.2f} s, "
           f"{small[1]:.0f} B per replica", big[0] / small[0],
           n >= 1_000_000 and big[0] <= 3 and big[1] <= 200,
           ratio_means=f"the time of {tenth:,} (10.0: linear)")
    report(f"gpuq cancel --launch of {n:,} pending as a process, {stored}", f"{big[2]:.2f} s",
           "1,000,000 in <= 1 s", f"{tenth:,} replicas: {small[2]:.2f} s", big[2] / small[2],
           n >= 1_000_000 and big[2] <= 1, ratio_means=f"the time of {tenth:,} (10.0: linear)")


if __name__ == "__main__":
    main()
