"""`make demo`: start the embedded stack, run a small sweep with a progress bar, show the
queue, stop everything that was started (`make demo KEEP=1` keeps it up for the dashboard
until Ctrl-C). Exits 0 when every job succeeded."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.cli.render import console, progress, queue_table
from app.client import Client
from app.core.paths import open_log, private_home
from app.core.settings import Settings

TRAIN = (
    "import os, time; rank = int(os.environ['GPUQ_JOB_RANK']); "
    "lr = [1e-4, 3e-4, 1e-3, 3e-3][rank % 4]; "
    "print(f'rank {rank}/{os.environ[\"GPUQ_NUM_JOBS\"]} lr={lr} "
    "on GPU {os.environ[\"CUDA_VISIBLE_DEVICES\"]}'); "
    "time.sleep(0.5 + rank % 3 * 0.5); print(f'rank {rank} loss={1 / (1 + 1000 * lr):.4f}')"
)


def _wait_for_workers(client: Client, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            alive = sum(h["workers_alive"] for h in client.call("status")["hosts"])
        except Exception:  # the broker is still starting
            alive = 0
        if alive:
            time.sleep(1)  # let the other GPU workers of this host come up too
            return sum(h["workers_alive"] for h in client.call("status")["hosts"])
        time.sleep(0.5)
    raise SystemExit("the GPU workers did not come up; see the log under GPUQ_HOME")


def main(keep: bool = False) -> int:
    """Run the demo; with `keep` (`make demo KEEP=1`) leave the stack up until Ctrl-C."""
    from app.dashboard.auth import dashboard_url  # FastAPI only when run

    settings = Settings()
    private_home(settings.home)
    root = Path(__file__).resolve().parents[2]
    log_path = settings.home / "demo-stack.log"
    console.print(f"[bold]gpuq demo[/]: starting the stack (log: {log_path})")
    with open_log(log_path) as log:
        stack = subprocess.Popen([str(Path(sys.executable).parent / "gpuq"), "up",
                                  "--procfile", str(root / "deploy" / "Procfile.dev")],
                                 stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    client = Client(settings)
    try:
        gpus = _wait_for_workers(client)
        console.print(f"{gpus} GPU workers up; dashboard at {dashboard_url(settings)} "
                      "(`gpuq dashboard --url` prints your login address), Flower at "
                      f"http://{settings.flower_address}:{settings.flower_port}")
        sweep = client.launch(["python", "-c", TRAIN], num_jobs=8, name="demo-sweep")
        pair = client.submit(["bash", "-c", "echo two GPUs: $CUDA_VISIBLE_DEVICES"], gpus=2,
                             name="demo-2gpu")
        counts = progress(client, sweep.id, len(sweep.job_ids))
        pair.wait(timeout_s=120)
        out = client.call("queue", launch_id=sweep.id, limit=50)
        queue_table(out["jobs"] + client.rows([pair.id]), out["total"] + 1)
        console.print(f"[dim]log of job {sweep.job_ids[-1]}:[/]\n{sweep.jobs[-1].logs()}")
        ok = counts.get("SUCCEEDED") == len(sweep.job_ids) and pair.status == "SUCCEEDED"
        console.print("[green]all jobs succeeded[/]" if ok else "[red]some jobs failed[/]")
        if keep:
            console.print("the stack stays up for the dashboard; Ctrl-C stops it")
            with contextlib.suppress(KeyboardInterrupt):
                stack.wait()
        return 0 if ok else 1
    finally:
        client.close()
        os.killpg(stack.pid, signal.SIGTERM)
        stack.wait(timeout=60)
        console.print("stack stopped")


if __name__ == "__main__":
    sys.exit(main(keep="--keep" in sys.argv[1:]))
