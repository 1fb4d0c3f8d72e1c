"""The everyday commands as a new user runs them, each a fresh process: `gpuq queue`, `gpuq
status` and `gpuq submit -- true`, with a stack up (embedded Redis, SQLite, 2 fake GPUs and
their worker, and its dashboard) and 10,000 jobs stored (one ended launch, filled straight
into the table and counted as `gpuq db recount` counts). Median of --runs; each submitted
job is left to end before the next run, so that none is refused as a duplicate of one
still waiting.

The stack's owner runs them with GPUQ_TRANSPORT unset: they reach the stack's dashboard
over its socket in GPUQ_HOME. The same reads are also timed over the dashboard's address
(GPUQ_URL and a token), the way a named user runs them.

Baseline, same run, the runs interleaved: the bare interpreter (`python3 -c "import sqlite3,
json"`), and the same commands in process (GPUQ_TRANSPORT=local: gpuq's database, Redis and
settings loaded by the command itself, as every command ran before the socket). Also shown:
CPU seconds (less swayed than wall time by other work on the machine) and the modules each
command loads.
"""

from __future__ import annotations

import argparse
import json
import resource
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from sqlalchemy import insert

from app.core.states import JobState
from app.store import counts
from app.store.models import Job, Launch
from bench.harness import BIN, ROOT, Bench, bench_stack, report

JOBS = 10_000
TARGET_X = 10
BARE = [sys.executable, "-c", "import sqlite3, json"]
COMMANDS = {"gpuq queue": ["queue"], "gpuq status": ["status"],
            "gpuq submit -- true": ["submit", "--", "true"]}
OVER_HTTP = {"gpuq queue, over GPUQ_URL": ["queue"], "gpuq status, over GPUQ_URL": ["status"]}
# Runs `gpuq ARGS` as the console script does and prints how many modules it loaded.
COUNTING = ("import atexit, sys\n"
            "atexit.register(lambda: print('MODULES', len(sys.modules), file=sys.stderr))\n"
            "sys.argv = ['gpuq', *sys.argv[1:]]\n"
            "from app.cli.main import main\n"
            "main()\n")


def _fill(bench: Bench) -> None:
    """One launch of JOBS replicas that ran and ended, as a finished sweep leaves them."""
    rt, now = bench.client.rt, time.time()
    with rt.session() as session:
        launch = Launch(name="stored", num_jobs=JOBS, command="true", created_at=now)
        session.add(launch)
        session.flush()
        row = {"command": "true", "submitted_at": now - 60, "started_at": now - 30,
               "ended_at": now, "exit_code": 0, "env": {}, "recover_exit_codes": [],
               "state": JobState.SUCCEEDED.value, "priority": 0, "gpus": 1,
               "launch_id": launch.id, "num_jobs": JOBS}
        session.connection().execute(insert(Job.__table__),  # type: ignore[attr-defined]
                                     [{**row, "rank": r} for r in range(JOBS)])
        counts.recount(session)


def _dashboard(bench: Bench) -> dict[str, str]:
    """Start the stack's dashboard; the variables of a client that reaches gpuq through it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = secrets.token_urlsafe(24)
    bench.start(str(BIN / "gpuq"), "dashboard", "--port", str(port), GPUQ_DASHBOARD_TOKEN=token)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return {"GPUQ_URL": f"http://127.0.0.1:{port}", "GPUQ_TOKEN": token}
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("the dashboard did not start") from None
            time.sleep(0.2)


def _timed(argv: list[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    """Wall and CPU seconds of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def _modules(args: list[str], env: dict[str, str], cwd: str) -> int:
    done = subprocess.run([sys.executable, "-c", COUNTING, *args], env=env, cwd=cwd,
                          check=True, capture_output=True, text=True)
    return int(done.stderr.rsplit("MODULES", 1)[1].split()[0])


def _settled(bench: Bench) -> Callable[[], None]:
    """Wait until no job but the stored ones is still to end."""
    def wait() -> None:
        waiting = [row["id"] for state in ("PENDING", "STARTING", "RUNNING")
                   for row in bench.client.call("queue", status=state, limit=100)["jobs"]]
        bench.client.wait(waiting, timeout_s=120)
    return wait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9)
    runs = parser.parse_args().runs
    walls: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    modules: dict[str, int] = {}
    with bench_stack(gpus=2, prepare=_fill) as bench:
        settle = _settled(bench)
        http = _dashboard(bench)
        owner = {k: v for k, v in bench.env(GPUQ_DASHBOARD_TOKEN=http["GPUQ_TOKEN"]).items()
                 if k != "GPUQ_TRANSPORT"}
        # How each command is run: as the owner (the stack's socket), in process, and
        # over the dashboard's address as a named user.
        ways = {"now": owner, "in process": bench.env(GPUQ_TRANSPORT="local")}
        for way, env in ways.items():
            for name, args in COMMANDS.items():
                modules[f"{way} {name}"] = _modules(args, env, str(ROOT))
                settle()
        for name, args in OVER_HTTP.items():
            modules[f"now {name}"] = _modules(args, {**ways["in process"], **http}, str(ROOT))
        for run in range(runs + 1):  # the first round warms the caches and is not counted
            measured = [("bare", BARE, owner)] + [
                (f"{way} {name}", [str(BIN / "gpuq"), *args], env)
                for way, env in ways.items() for name, args in COMMANDS.items()] + [
                (f"now {name}", [str(BIN / "gpuq"), *args], {**ways["in process"], **http})
                for name, args in OVER_HTTP.items()]
            for key, argv, env in measured:
                wall, cpu = _timed(argv, env, str(ROOT))
                settle()
                if run:
                    walls.setdefault(key, []).append(wall)
                    cpus.setdefault(key, []).append(cpu)
    bare, bare_cpu = statistics.median(walls["bare"]), statistics.median(cpus["bare"])
    figures = {}
    for name in [*COMMANDS, *OVER_HTTP]:
        now = statistics.median(walls[f"now {name}"])
        now_cpu = statistics.median(cpus[f"now {name}"])
        figures[name] = {"s": now, "x": now / bare, "cpu_x": now_cpu / bare_cpu,
                         "modules": modules[f"now {name}"]}
        if name in COMMANDS:
            old = statistics.median(walls[f"in process {name}"])
            figures[name]["in_process_s"] = old
            baseline = (f"bare interpreter {bare:.3f} s (CPU {bare_cpu:.3f} s); in process "
                        f"{old:.3f} s, {old / bare:.1f}x, "
                        f"{modules[f'in process {name}']} modules")
            ratio, means = old / now, "faster than in process"
        else:
            baseline = f"bare interpreter {bare:.3f} s (CPU {bare_cpu:.3f} s)"
            ratio, means = now / bare, "the bare interpreter"
        report(f"{name}, 10,000 jobs stored",
               f"{now:.3f} s, {now / bare:.1f}x the bare interpreter (CPU {now_cpu:.3f} s, "
               f"{now_cpu / bare_cpu:.1f}x), {modules[f'now {name}']} modules",
               f"<= {TARGET_X}x the bare interpreter", baseline, ratio, now <= TARGET_X * bare,
               ratio_means=means)
    print(json.dumps({"bare_s": bare, "runs": runs, "commands": figures}))


if __name__ == "__main__":
    main()
