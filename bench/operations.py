"""Queue operation with 10,000 jobs stored: the first page of 50.

Measured in process (local transport), over the remote transport (a control worker), and
as `gpuq queue --json` in a fresh process per call. Baseline, same run: a fresh Python
subprocess per operation that imports the stack and asks the same question, the way
controllers that generate and run code per operation work.
"""

from __future__ import annotations

import subprocess
import sys

from app.ops.registry import call_local
from bench.harness import BIN, bench_stack, median_time, report

JOBS = 10_000
BASELINE_CODE = (
    "import celery, kombu, redis, sqlalchemy, sqlmodel, pydantic_settings, cloudpickle; "
    "from app.core.settings import Settings; from app.runtime import Runtime; "
    "from app.ops.registry import call_local; "
    "call_local(Runtime(Settings()), 'queue', {'limit': 50})"
)


def main() -> None:
    with bench_stack(control=True) as bench:
        client = bench.client
        client.launch("true", num_jobs=JOBS)
        remote = type(client)(bench.settings, "remote")
        env = bench.env()

        local_s = median_time(lambda: call_local(client.rt, "queue", {"limit": 50}), runs=50)
        remote_s = median_time(lambda: remote.call("queue", limit=50), runs=20)
        cli_s = median_time(lambda: subprocess.run(
            [str(BIN / "gpuq"), "queue", "--json"], env=env, check=True,
            stdout=subprocess.DEVNULL), runs=5)
        baseline_s = median_time(lambda: subprocess.run(
            [sys.executable, "-c", BASELINE_CODE], env=env, check=True), runs=5)
        remote.close()
    report("queue, first 50 of 10,000 jobs",
           f"in process {local_s * 1000:.1f} ms, remote {remote_s * 1000:.1f} ms, "
           f"`gpuq queue` process {cli_s:.2f} s", "<= 10 ms in process; <= 0.5 s as a process",
           f"fresh subprocess per operation: {baseline_s:.2f} s", baseline_s / local_s,
           local_s <= 0.010 and cli_s <= 0.5)


if __name__ == "__main__":
    main()
