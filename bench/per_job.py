"""What one job costs gpuq itself: database statements, database transactions, Redis round
trips and CPU time, from its launch to its end, on SQLite and the embedded Redis.

The dispatcher and the attempt run here in one process, as a GPU worker runs them: launch,
then over and over a dispatch pass (the one that follows a job's end), the attempt of each
job it routed (its `true` process included) and its release. Nothing else runs, so every
statement and round trip counted is the job's. `--before` figures are those of the same
count on the code before batched state saves (bench/RESULTS.md).

Baseline, same run: one plain SQLite transaction (an UPDATE and a commit) and one Redis
round trip (PING), the floor a job's records cost with any design that keeps them.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import tempfile
import time
from pathlib import Path

import redis.connection
from sqlalchemy import event, text

from app.client import Client
from app.core import keys
from app.core.keys import gpu_queue
from app.core.settings import Settings
from app.store import cluster
from app.store.embedded_redis import EmbeddedRedis
from bench.harness import report, stop_cleanly_on_sigterm
from scheduler.dispatch.allocator import Dispatcher
from scheduler.worker.attempt import run_attempt

HOST, GPUS = "bench", 8


class Counts:
    def __init__(self) -> None:
        self.statements = self.commits = self.round_trips = 0

    def snapshot(self) -> tuple[int, int, int]:
        return self.statements, self.commits, self.round_trips


def _count(engine, counts: Counts) -> None:  # type: ignore[no-untyped-def]
    event.listen(engine, "before_cursor_execute",
                 lambda *_: setattr(counts, "statements", counts.statements + 1))
    event.listen(engine, "commit", lambda *_: setattr(counts, "commits", counts.commits + 1))
    send = redis.connection.AbstractConnection.send_packed_command

    def counted(self, command, check_health=True):  # type: ignore[no-untyped-def]
        counts.round_trips += 1
        return send(self, command, check_health)

    redis.connection.AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]


def _routed(r: redis.Redis) -> list[tuple[int, int]]:
    """The (job, attempt) of every message the pass sent, taken off the GPU queues."""
    found = []
    for i in range(GPUS):
        while (raw := r.rpop(gpu_queue(HOST, i))) is not None:
            body = json.loads(base64.b64decode(json.loads(raw)["body"]))
            found.append((int(body[0][0]), int(body[0][1])))
    return found


def _floor(rt, runs: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    with rt.engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS bench_floor (id INTEGER PRIMARY KEY, "
                          "n INTEGER)"))
        conn.execute(text("INSERT OR IGNORE INTO bench_floor VALUES (1, 0)"))
    start = time.process_time()
    for _ in range(runs):
        with rt.engine.begin() as conn:
            conn.execute(text("UPDATE bench_floor SET n = n + 1 WHERE id = 1"))
        rt.redis.ping()
    cpu = (time.process_time() - start) / runs
    return cpu, 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400)
    args = parser.parse_args()
    stop_cleanly_on_sigterm()
    home = Path(tempfile.mkdtemp(prefix="gpuq-bench-"))
    settings = Settings(home=home, fake_gpus=GPUS, cpu_slots=0, hostname=HOST,
                        log_level="ERROR", _env_file=None)
    server = EmbeddedRedis(settings)
    settings = settings.model_copy(update={"redis_url": server.start()})
    client = Client(settings)
    try:
        rt = client.rt
        counts = Counts()
        cluster.register_host(rt.redis, HOST, {i: {"name": "fake"} for i in range(GPUS)})
        rt.redis.set(keys.INVENTORY_SINCE, 0)
        for i in range(GPUS):
            cluster.beat(rt.redis, HOST, i, ttl_s=3600)
        client.launch("true", num_jobs=GPUS)  # warm: compiled statements, connections
        _run_all(rt)
        _count(rt.engine, counts)
        start_counts, cpu0, wall0 = counts.snapshot(), time.process_time(), time.perf_counter()
        client.launch("true", num_jobs=args.jobs)
        _run_all(rt)
        cpu = (time.process_time() - cpu0) / args.jobs
        wall = (time.perf_counter() - wall0) / args.jobs
        statements, commits, trips = (b - a for a, b in zip(start_counts, counts.snapshot(),
                                                            strict=True))
        floor_cpu, _ = _floor(rt, 500)
    finally:
        client.close()
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
    n = args.jobs
    print(f"per job, {n} `true` jobs on {GPUS} fake GPUs, dispatched and run in one process: "
          f"{statements / n:.1f} database statements, {commits / n:.1f} transactions, "
          f"{trips / n:.1f} Redis round trips, {cpu * 1000:.2f} ms CPU of gpuq "
          f"({wall * 1000:.2f} ms wall, the job's own process included)", flush=True)
    report("gpuq CPU per job", f"{cpu * 1000:.2f} ms",
           "the fewest statements and round trips that keep each invariant",
           f"one SQLite transaction and one Redis round trip: {floor_cpu * 1000:.3f} ms",
           cpu / floor_cpu, True, ratio_means="the baseline's CPU")


def _run_all(rt) -> None:  # type: ignore[no-untyped-def]
    """Dispatch and run until nothing is left to route."""
    Dispatcher(rt).dispatch()
    while routed := _routed(rt.redis):
        for job_id, attempt in routed:
            run_attempt(rt, job_id, attempt)  # its end runs the next dispatch pass


if __name__ == "__main__":
    main()
