"""One dispatch pass with the queue N deep: the pass that follows a job's end, one of 8 GPUs
free and the head of the queue fits it. Measured at 1,000, 100,000 and 1,000,000 PENDING GPU
jobs (`--depths` to choose) of one priority, spread over `--users` users (1), on SQLite and
the embedded Redis; fair share merges that many groups each pass.

Baseline, same run, same table: the same passes without the indexes of revision 0003, as
gpuq ran them before, where each candidate query sorts the queue.

Writes the p50 and p99 per depth to bench/scale-pass.json and redraws bench/scale.png
(bench.plot_scale; `--dir` to write them elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert, text, update
from sqlmodel import col, select

from app.core import keys
from app.core.settings import Settings
from app.core.states import JobState
from app.runtime import Runtime
from app.store import cluster
from app.store.embedded_redis import EmbeddedRedis
from app.store.models import CANDIDATE_INDEXES, HOLDING_INDEX, Job
from bench import plot_scale
from bench.harness import report, stop_cleanly_on_sigterm
from scheduler.dispatch.allocator import Dispatcher

HOST, GPUS = "bench", 8
FILL_BATCH = 50_000


def _fill(rt: Runtime, depth: int, users: int = 1) -> None:
    """`depth` PENDING 1-GPU jobs of one priority, spread over `users` users (each its own
    project): the groups fair share merges in every pass."""
    now = time.time()
    rows = [{"command": "true", "submitted_at": now, "env": {}, "recover_exit_codes": [],
             "state": JobState.PENDING.value, "priority": 0, "gpus": 1,
             "owner": f"user{u}", "project": f"user{u}"} for u in range(users)]
    with rt.engine.begin() as conn:
        for start in range(0, depth, FILL_BATCH):
            conn.execute(insert(Job.__table__),  # type: ignore[arg-type]
                         [rows[(start + i) % users]
                          for i in range(min(FILL_BATCH, depth - start))])


def _announce_gpus(rt: Runtime) -> None:
    cluster.register_host(rt.redis, HOST, {i: {"name": "fake"} for i in range(GPUS)})
    rt.redis.set(keys.INVENTORY_SINCE, 0)  # an inventory long settled
    for i in range(GPUS):
        cluster.beat(rt.redis, HOST, i, ttl_s=3600)


def _end_one(rt: Runtime) -> None:
    """The oldest STARTING job ends: its row settles and its GPU is released."""
    with rt.session() as session:
        job = session.exec(select(Job).where(col(Job.state) == JobState.STARTING.value)
                           .order_by(col(Job.id)).limit(1)).one()
        cluster.release(rt.redis, HOST, job.gpu_ids or [], cluster.holder(job.id or 0,
                                                                          job.attempt))
        session.execute(update(Job).where(col(Job.id) == job.id)
                        .values(state=JobState.SUCCEEDED.value))
        session.commit()


def _passes(rt: Runtime, count: int) -> list[float]:
    dispatcher = Dispatcher(rt)
    times = []
    for _ in range(count):
        _end_one(rt)
        start = time.perf_counter()
        routed = dispatcher._pass()
        times.append(time.perf_counter() - start)
        assert routed == 1, routed
    return times


def _p(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def measure(depth: int, passes: int, baseline_passes: int, users: int = 1
            ) -> tuple[list[float], list[float]]:
    home = Path(tempfile.mkdtemp(prefix="gpuq-bench-depth-"))
    settings = Settings(home=home, hostname=HOST, log_level="ERROR", redis_url=None,
                        database_url=None, _env_file=None)
    server = EmbeddedRedis(settings)
    settings = settings.model_copy(update={"redis_url": server.start()})
    rt = Runtime(settings)
    try:
        _fill(rt, depth, users)
        _announce_gpus(rt)
        routed = Dispatcher(rt).dispatch()
        assert routed == GPUS, routed  # every GPU busy: the steady state
        ours = _passes(rt, passes)
        with rt.engine.begin() as conn:  # the index set before revision 0003
            for name in [HOLDING_INDEX, "ix_jobs_state", *(n for n, _ in CANDIDATE_INDEXES)]:
                conn.execute(text(f"DROP INDEX {name}"))
            conn.execute(text("CREATE INDEX ix_jobs_dispatch ON jobs "
                              "(state, waiting, priority, id)"))
            conn.execute(text("CREATE INDEX ix_jobs_dispatch_cpu ON jobs "
                              "(state, gpus, priority, id)"))
        theirs = _passes(rt, baseline_passes)
    finally:
        rt.close()
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
    return ours, theirs


def write_figures(points: list[tuple[int, list[float], list[float]]], path: Path) -> None:
    """Per depth, p50 and p99 of gpuq's passes and of the baseline's, for bench.plot_scale."""
    def summary(times: list[float]) -> dict[str, float]:
        return {"p50_ms": round(statistics.median(times) * 1000, 3),
                "p99_ms": round(_p(times, 0.99), 3), "passes": len(times)}

    figures = {"measured_at": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
               "gpus": GPUS, "database": "sqlite", "target_p99_ms": 5.0,
               "depths": [{"depth": depth, "gpuq": summary(ours),
                           "before_0003": summary(theirs)}
                          for depth, ours, theirs in points]}
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depths", default="1000,100000,1000000")
    parser.add_argument("--passes", type=int, default=200)
    parser.add_argument("--users", type=int, default=1,
                        help="users (each its own project) the queue is spread over, all "
                        "at one priority: the groups fair share merges every pass")
    plot_scale.add_output_options(parser, plot_scale.PASS_FILE, plot_scale.THROUGHPUT_FILE)
    args = parser.parse_args()
    stop_cleanly_on_sigterm()
    points = []
    for depth in (int(d) for d in args.depths.split(",")):
        # The baseline's passes sort the whole queue: fewer of them at depth.
        ours, theirs = measure(depth, args.passes, 50 if depth <= 100_000 else 10,
                               args.users)
        points.append((depth, ours, theirs))
        p99, base_p99 = _p(ours, 0.99), _p(theirs, 0.99)
        report(f"dispatch pass, {depth:,} pending of {args.users} user(s)",
               f"p50 {statistics.median(ours) * 1000:.2f} ms, p99 {p99:.2f} ms "
               f"({len(ours)} passes)", "p99 <= 5 ms at 1,000,000",
               "without the indexes of revision 0003: "
               f"p50 {statistics.median(theirs) * 1000:.1f} ms, p99 {base_p99:.1f} ms "
               f"({len(theirs)} passes)",
               base_p99 / p99, p99 <= 5.0)
    args.dir.mkdir(parents=True, exist_ok=True)
    write_figures(points, args.dir / plot_scale.PASS_FILE)
    plot_scale.plot(args.dir, args.plot)


if __name__ == "__main__":
    main()
