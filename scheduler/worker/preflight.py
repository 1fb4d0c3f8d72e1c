"""Preflight checks that run on a job's GPUs before the job: NCCL all-reduce built in.

A check is a shell command run with the job's environment (so CUDA_VISIBLE_DEVICES names
exactly its GPUs). Exit 0 passes; exit 3 skips, its last output line saying why; anything
else fails the job as FAILED_PRECHECK, with the check's output in the job's log.

    python -m scheduler.worker.preflight nccl   # the built-in check, by hand on a GPU host
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from app.core.settings import Settings

SKIP_EXIT = 3
# Found on the worker's PATH, as the executor's bash is: the job's PATH may hold anything.
BASH = shutil.which("bash") or "/bin/bash"

@dataclass
class PreflightResult:
    status: str  # passed | failed | skipped
    reason: str
    output: str


def run_check(settings: Settings, name: str, env: dict[str, str]) -> PreflightResult:
    command = settings.preflight_checks[name]
    try:
        proc = subprocess.run([BASH, "-c", command], env=env, capture_output=True, text=True,
                              timeout=settings.preflight_timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return PreflightResult("failed", f"preflight {name} timed out after "
                               f"{settings.preflight_timeout_s}s", output)
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if proc.returncode == 0:
        return PreflightResult("passed", f"preflight {name} passed: {last}".rstrip(": "), output)
    if proc.returncode == SKIP_EXIT:
        return PreflightResult("skipped", f"preflight {name} skipped: {last}", output)
    return PreflightResult("failed", f"preflight {name} failed (exit {proc.returncode}): {last}",
                           output)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _all_reduce(rank: int, world: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.cuda.set_device(rank)
        tensor = torch.full((1 << 20,), float(rank + 1), device=f"cuda:{rank}")
        dist.all_reduce(tensor)
        torch.cuda.synchronize()
        expected = world * (world + 1) / 2
        if not bool((tensor == expected).all()):
            raise RuntimeError(f"rank {rank}: all-reduce gave {tensor[0].item()}, "
                               f"expected {expected}")
    finally:
        dist.destroy_process_group()


def nccl_check() -> int:
    """All-reduce 4 MiB over every visible GPU with NCCL; 0 pass, 1 fail, 3 skip."""
    try:
        import torch
        import torch.distributed as dist
        import torch.multiprocessing as mp
    except ImportError:
        print("torch is not installed")
        return SKIP_EXIT
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        print("torch sees no CUDA device")
        return SKIP_EXIT
    if not dist.is_nccl_available():
        print("this torch build has no NCCL")
        return SKIP_EXIT
    world = torch.cuda.device_count()
    started = time.monotonic()
    try:
        mp.spawn(_all_reduce, args=(world, _free_port()), nprocs=world, join=True)
    except Exception as e:
        print(f"NCCL all-reduce over {world} GPUs failed: {e}")
        return 1
    print(f"NCCL all-reduce over {world} GPUs in {(time.monotonic() - started) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["nccl"]:
        sys.exit("usage: python -m scheduler.worker.preflight nccl")
    sys.exit(nccl_check())
