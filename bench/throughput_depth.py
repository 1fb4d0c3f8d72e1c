"""Throughput against queue depth: 2,000 `true` jobs on 8 fake GPUs, end to end to
SUCCEEDED (as bench/throughput.py measures it), with 0, 100,000 and 1,000,000 PENDING
replicas queued behind them (`--depths`, `--jobs` to choose). The measured launch, and its
warm-up, run at priority 10; the jobs behind are 1-GPU `true` jobs of the local backend at
priority 0, written straight into the jobs table before the workers start. Each depth is a
fresh stack (home, Redis, SQLite, workers).

Baselines, same run and machine: plain Celery tasks that each run `true` in a subprocess on
8 worker processes (bench.throughput.plain_rate); and, where Slurm is installed and its
daemons answer (deploy/slurm/setup.sh), a 1,000-task Slurm array of `true`, timed from
sbatch until squeue lists none of its tasks.

The jobs behind belong to `--users` users (10), each its own project, so that a pass with
fair share on merges that many groups; `--fair-share` measures each depth with fair share
on, off, or both (the default), the measured launch being the stack owner's.

Targets: at every depth, at least 0.8x plain Celery's rate; at the largest depth, at least
0.9x the rate at the smallest (0). Writes the figures to bench/scale-throughput.json and
redraws bench/scale.png (bench.plot_scale; `--dir` to write them elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

from sqlalchemy import func, insert, literal, null, select

from app.core.states import JobState
from app.store.models import Job, JobEvent
from app.store.spec import JobSpec
from bench import plot_scale
from bench.harness import Bench, bench_stack, report, stop_cleanly_on_sigterm
from bench.throughput import GPUS, gpuq_rate, plain_rate

MEASURED_PRIORITY = 10
FILLER_PRIORITY = 0
FILL_BATCH = 50_000
TARGET_RATIO_PLAIN = 0.8
TARGET_RATIO_DEPTH = 0.9
SLURM_TIMEOUT_S = 600


def filler_row(now: float, user: str) -> dict[str, Any]:
    """The row `gpuq submit --allow-duplicate --priority 0 true` stores for `user`: PENDING,
    local, 1 GPU, waiting for nothing, no launch and no payload, in the user's project."""
    spec = JobSpec.parse({"command": "true", "gpus": 1, "priority": FILLER_PRIORITY,
                          "backend": "local"})
    row = spec.model_dump(exclude={"after"})
    row.update(content_hash=spec.content_hash(), state=JobState.PENDING.value,
               submitted_at=now, launch_id=None, num_jobs=1, rank=0, waiting=False,
               reason=None, owner=user, project=user)
    return row


def fill(bench: Bench, depth: int, users: int) -> None:
    """`depth` PENDING jobs of `users` users, each with its 'submitted' event, in one
    transaction. Run on an empty database, before any worker starts."""
    now = time.time()
    rows = [filler_row(now, f"user{u}") for u in range(users)]
    jobs, events = Job.__table__, JobEvent.__table__  # type: ignore[attr-defined]
    with bench.client.rt.engine.begin() as conn:
        for start in range(0, depth, FILL_BATCH):
            conn.execute(insert(jobs), [rows[(start + i) % users]
                                        for i in range(min(FILL_BATCH, depth - start))])
        conn.execute(insert(events).from_select(
            ["job_id", "at", "from_state", "to_state", "reason"],
            select(jobs.c.id, literal(now), null(), literal(JobState.PENDING.value),
                   literal("submitted"))))


def pending_behind(bench: Bench) -> int:
    jobs = Job.__table__.c  # type: ignore[attr-defined]
    with bench.client.rt.engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(
            jobs.state == JobState.PENDING.value,
            jobs.priority == FILLER_PRIORITY)).scalar_one())


def measure(depth: int, jobs: int, users: int = 10, fair_share: bool = True
            ) -> dict[str, Any]:
    """gpuq's rate with `depth` jobs of `users` users queued behind, on a fresh stack (its
    home removed), fair share on or off."""
    seen: dict[str, Any] = {}

    def prepare(bench: Bench) -> None:
        seen["home"] = bench.settings.home
        start = time.perf_counter()
        if depth:
            fill(bench, depth, users)
        seen["fill_s"] = time.perf_counter() - start

    before = os.environ.get("GPUQ_FAIR_SHARE")
    os.environ["GPUQ_FAIR_SHARE"] = str(fair_share).lower()  # the stack's settings read it
    try:
        with bench_stack(gpus=GPUS, prepare=prepare) as bench:
            assert bench.settings.fair_share is fair_share
            rate = gpuq_rate(bench, jobs, priority=MEASURED_PRIORITY)
            left = pending_behind(bench)
    finally:
        if before is None:
            os.environ.pop("GPUQ_FAIR_SHARE", None)
        else:
            os.environ["GPUQ_FAIR_SHARE"] = before
        if "home" in seen:
            shutil.rmtree(seen["home"], ignore_errors=True)
    return {"depth": depth, "fair_share": fair_share, "users_behind": users,
            "jobs_s": round(rate, 1), "fill_s": round(seen["fill_s"], 2),
            "pending_behind_after": left}


def _slurm_ready() -> str | None:
    """None when Slurm can take the array; otherwise why not."""
    for tool in ("sbatch", "squeue", "sinfo", "scancel"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH (deploy/slurm/setup.sh installs a one-node Slurm)"
    try:
        subprocess.run(["sinfo"], capture_output=True, timeout=20, check=True)
    except subprocess.TimeoutExpired:
        return "the Slurm daemons do not answer (sinfo timed out)"
    except subprocess.CalledProcessError as e:
        message = e.stderr.decode(errors="replace").strip().splitlines()
        return f"the Slurm daemons do not answer (sinfo: {message[-1] if message else e})"
    return None


def _array_left(job_id: str) -> bool:
    """Whether squeue still lists a task of the array."""
    out = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%i"],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:  # a job Slurm has already forgotten is done
        return "invalid job id" not in out.stderr.lower()
    return bool(out.stdout.strip())


def slurm_rate(tasks: int) -> tuple[float | None, str]:
    """A `tasks`-task array of `true`: tasks per second from sbatch until squeue lists none
    of them; (None, why) when Slurm is not there or the array did not finish."""
    why = _slurm_ready()
    if why is not None:
        return None, why
    start = time.perf_counter()
    out = subprocess.run(["sbatch", "--parsable", f"--array=0-{tasks - 1}",
                          "--job-name=gpuq-bench-array", "--output=/dev/null",
                          f"--chdir={tempfile.gettempdir()}", "--wrap", "true"],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        return None, f"sbatch refused the array: {out.stderr.strip()}"
    job_id = out.stdout.strip().split(";")[0]
    done = False
    try:
        while time.perf_counter() - start < SLURM_TIMEOUT_S:
            if not _array_left(job_id):
                done = True
                break
            time.sleep(0.2)
        seconds = time.perf_counter() - start
    finally:
        if not done:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    if not done:
        return None, f"array {job_id} not done after {SLURM_TIMEOUT_S} s (cancelled)"
    return tasks / seconds, f"array job {job_id}, {seconds:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description="Throughput against queue depth.")
    parser.add_argument("--depths", default="0,100000,1000000",
                        help="PENDING jobs queued behind the measured launch, comma-separated")
    parser.add_argument("--jobs", type=int, default=2_000, help="jobs of the measured launch")
    parser.add_argument("--users", type=int, default=10,
                        help="users (each its own project) the jobs behind belong to")
    parser.add_argument("--fair-share", choices=("on", "off", "both"), default="both",
                        help="measure each depth with fair share on, off, or both")
    parser.add_argument("--slurm-tasks", type=int, default=1_000,
                        help="tasks of the Slurm array baseline")
    plot_scale.add_output_options(parser, plot_scale.THROUGHPUT_FILE, plot_scale.PASS_FILE)
    args = parser.parse_args()
    depths = sorted({int(d) for d in args.depths.split(",")})
    stop_cleanly_on_sigterm()

    with bench_stack() as bench:  # the broker alone: the baseline's workers are its own
        home = bench.settings.home
        plain = plain_rate(bench, args.jobs)
    shutil.rmtree(home, ignore_errors=True)
    print(f"plain Celery + subprocess, {GPUS} processes, {args.jobs:,} tasks: "
          f"{plain:.0f} jobs/s", flush=True)

    points, off_points = [], []
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.fair_share]
    for depth in depths:
        for fair_share in modes:
            point = measure(depth, args.jobs, args.users, fair_share)
            point["ratio_plain"] = round(point["jobs_s"] / plain, 3)
            (points if fair_share or len(modes) == 1 else off_points).append(point)
            report(f"throughput, {args.jobs:,} true jobs, {GPUS} fake GPUs, {depth:,} pending "
                   f"behind of {args.users} users, fair share {'on' if fair_share else 'off'} "
                   f"(filled in {point['fill_s']:.1f} s, {point['pending_behind_after']:,} "
                   "still pending at the end)", f"{point['jobs_s']:.0f} jobs/s",
                   f">= {TARGET_RATIO_PLAIN:g}x plain Celery",
                   f"plain Celery + subprocess, {GPUS} processes: {plain:.0f} jobs/s",
                   point["ratio_plain"], point["ratio_plain"] >= TARGET_RATIO_PLAIN,
                   ratio_means="the baseline's rate", digits=2)
    for on, off in zip(points, off_points, strict=False):
        print(f"fair share on against off at {on['depth']:,} pending: {on['jobs_s']:.0f} "
              f"against {off['jobs_s']:.0f} jobs/s, {on['jobs_s'] / off['jobs_s']:.2f}x",
              flush=True)

    slurm, slurm_note = slurm_rate(args.slurm_tasks)
    if slurm is None:
        print(f"Slurm array baseline: not run: {slurm_note}", flush=True)
    else:
        print(f"Slurm array baseline, {args.slurm_tasks:,} `true` tasks: {slurm:.0f} jobs/s "
              f"({slurm_note}); gpuq at {depths[0]:,} pending: "
              f"{points[0]['jobs_s'] / slurm:.2f}x its rate", flush=True)

    depth_ratio = None
    if len(points) > 1:
        first, last = points[0], points[-1]
        depth_ratio = round(last["jobs_s"] / first["jobs_s"], 3)
        report(f"throughput at {last['depth']:,} pending against {first['depth']:,}",
               f"{last['jobs_s']:.0f} jobs/s",
               f">= {TARGET_RATIO_DEPTH:g}x the rate at {first['depth']:,}",
               f"{first['jobs_s']:.0f} jobs/s at {first['depth']:,} pending", depth_ratio,
               depth_ratio >= TARGET_RATIO_DEPTH, ratio_means=f"the rate at {first['depth']:,}",
               digits=2)

    figures = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "gpus": GPUS,
        "jobs": args.jobs, "measured_priority": MEASURED_PRIORITY,
        "filler_priority": FILLER_PRIORITY, "plain_celery_jobs_s": round(plain, 1),
        "slurm_array": None if slurm is None else {"tasks": args.slurm_tasks,
                                                   "jobs_s": round(slurm, 1)},
        "slurm_note": slurm_note, "target_ratio_plain": TARGET_RATIO_PLAIN,
        "target_ratio_depth": TARGET_RATIO_DEPTH, "depths": points,
        "fair_share_off": off_points,
        "largest_over_smallest": depth_ratio,
    }
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / plot_scale.THROUGHPUT_FILE
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {path}", flush=True)
    plot_scale.plot(args.dir, args.plot)


if __name__ == "__main__":
    main()
