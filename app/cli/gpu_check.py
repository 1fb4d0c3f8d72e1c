"""`make gpu-check`: gpuq against a real NVIDIA driver, real GPUs and torch.

    python -m app.cli.gpu_check     # on a GPU host: a table, exit 1 on any failure

(a) the monitor's NVML readings agree with nvidia-smi; (b) a gpuq job holding ~2 GiB shows
in its GPU's reading, which does not call the GPU foreign; (c) a process outside gpuq that
holds memory gets its GPU marked foreign, and a 1-GPU job is not placed there; (d) with
2+ GPUs, a 2-GPU job with `--preflight nccl` succeeds. Without a driver it prints one line
and exits 0. The jobs and the foreign process run this module's `hold` program:

    python -m app.cli.gpu_check hold MIB READY_FILE RELEASE_FILE
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from app.core.settings import Settings
from scheduler.worker.monitor import GpuReading, NvmlProvider

if TYPE_CHECKING:
    from scheduler.facade import GPUJobScheduler

T = TypeVar("T")

# nvidia-smi rounds to MiB as the monitor does; memory use moves between the two readings,
# and utilisation is a sampled average that moves a lot.
TOTAL_TOLERANCE_MB = 1
USED_TOLERANCE_MB = 256
USED_TOLERANCE_FRACTION = 0.05
UTILIZATION_TOLERANCE_PCT = 20
HOLD_MIB = 2048  # what the gpuq job of check (b) allocates
HOLD_MAX_S = 120.0  # a hold program left behind ends by itself
START_TIMEOUT_S = 120.0  # torch's import and CUDA start-up come before the memory shows
MARK_TIMEOUT_S = 15.0  # several monitor intervals
PENDING_FOR_S = 5.0  # how long a job must stay off a foreign-only host
SMI_QUERY = ["nvidia-smi", "--query-gpu=index,memory.used,memory.total,utilization.gpu",
             "--format=csv,noheader,nounits"]


@dataclass
class Check:
    name: str
    status: str  # held | failed | skipped
    detail: str


# -- (a) readings against nvidia-smi ------------------------------------------------------

def parse_smi(text: str) -> list[GpuReading]:
    """nvidia-smi's CSV lines (index, used MiB, total MiB, utilisation %) as readings."""
    readings = []
    for line in text.strip().splitlines():
        index, used, total, util = (field.strip() for field in line.split(","))
        # "[N/A]" where a GPU does not report utilisation (some MIG and vGPU set-ups).
        readings.append(GpuReading(int(index), "", int(used), int(total),
                                   int(util) if util.isdigit() else -1))
    return readings


def compare_gpu(nvml: GpuReading, smi: GpuReading, reserved_mb: int = 0) -> list[str]:
    """What differs beyond tolerance between the monitor's and nvidia-smi's reading of one
    GPU (empty when they agree). NVML's v1 `used`, the monitor's, counts the memory the
    driver reserves (`reserved_mb`); recent drivers' nvidia-smi does not."""
    problems = []
    if abs(nvml.memory_total_mb - smi.memory_total_mb) > TOTAL_TOLERANCE_MB:
        problems.append(f"total {nvml.memory_total_mb} vs {smi.memory_total_mb} MiB")
    # Drivers differ in whether nvidia-smi's `used` counts the reserved part: either agrees.
    used_gap = min((nvml.memory_used_mb - smi.memory_used_mb - r for r in (0, reserved_mb)),
                   key=abs)
    allowed = max(USED_TOLERANCE_MB, USED_TOLERANCE_FRACTION * smi.memory_used_mb)
    if abs(used_gap) > allowed:
        problems.append(f"used {nvml.memory_used_mb} (reserved {reserved_mb}) vs "
                        f"{smi.memory_used_mb} MiB, off by {used_gap} > {allowed:.0f}")
    if smi.utilization_pct >= 0 and abs(nvml.utilization_pct - smi.utilization_pct) > \
            UTILIZATION_TOLERANCE_PCT:
        problems.append(f"utilisation {nvml.utilization_pct} vs {smi.utilization_pct} %")
    return problems


def compare_readings(nvml: list[GpuReading], smi: list[GpuReading],
                     reserved_mb: dict[int, int] | None = None) -> Check:
    """Check (a) from both sets of readings: every GPU within tolerance."""
    name = "(a) NVML readings = nvidia-smi"
    if [g.index for g in nvml] != [g.index for g in smi]:
        return Check(name, "failed", f"GPUs {[g.index for g in nvml]} (NVML) vs "
                     f"{[g.index for g in smi]} (nvidia-smi)")
    reserved_mb = reserved_mb or {}
    figures, problems = [], []
    for ours, theirs in zip(nvml, smi, strict=True):
        reserved = reserved_mb.get(ours.index, 0)
        figures.append(f"GPU{ours.index} used {ours.memory_used_mb}/{theirs.memory_used_mb} "
                       f"(reserved {reserved}) total {ours.memory_total_mb}/"
                       f"{theirs.memory_total_mb} MiB util {ours.utilization_pct}/"
                       f"{theirs.utilization_pct} %")
        problems += [f"GPU{ours.index}: {p}" for p in compare_gpu(ours, theirs, reserved)]
    if problems:
        return Check(name, "failed", "; ".join(problems))
    return Check(name, "held", "; ".join(figures) + " (monitor/nvidia-smi)")


def reserved_memory_mb(provider: NvmlProvider) -> dict[int, int]:
    """Memory the driver reserves per GPU (NVML v2), or nothing where NVML cannot say."""
    nvml: Any = provider._nvml
    reserved = {}
    for index in range(provider.count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
            reserved[index] = int(info.reserved) // 2**20
        except (AttributeError, nvml.NVMLError):  # an older driver or nvidia-ml-py
            pass
    return reserved


def check_readings(provider: NvmlProvider) -> Check:
    smi = subprocess.run(SMI_QUERY, capture_output=True, text=True, timeout=60, check=True)
    return compare_readings(provider.readings(), parse_smi(smi.stdout),
                            reserved_memory_mb(provider))


# -- the programs that hold GPU memory ----------------------------------------------------

def hold(mib: int, ready: Path, release: Path) -> int:
    """Allocate `mib` MiB on the first visible GPU, say so in `ready`, keep it until
    `release` exists (or HOLD_MAX_S)."""
    import torch

    block = torch.ones(mib * 2**20, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    ready.write_text(str(os.getpid()))
    deadline = time.monotonic() + HOLD_MAX_S
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    del block
    return 0


def hold_command(mib: int, ready: Path, release: Path) -> list[str]:
    return [sys.executable, "-m", "app.cli.gpu_check", "hold", str(mib),
            str(ready), str(release)]


def until(predicate: Callable[[], T], timeout_s: float, poll_s: float = 0.25) -> T | None:
    """The first truthy value of `predicate()` within `timeout_s`, else None."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value or None
        time.sleep(poll_s)


# -- (b), (c), (d) on a private stack -------------------------------------------------------

def start_stack(home: Path, gpus: int) -> GPUJobScheduler:
    """Embedded Redis, SQLite and a worker for each of the first `gpus` GPUs under `home`."""
    from scheduler.facade import GPUJobScheduler

    settings = Settings(home=home, redis_url=None, database_url=None, fake_gpus=None,
                        hostname="gpu-check", heartbeat_s=1, monitor_interval_s=0.5,
                        cpu_slots=0, kill_grace_s=2, _env_file=None)
    scheduler = GPUJobScheduler(num_gpus=gpus, settings=settings)
    scheduler.start(timeout_s=60)
    return scheduler


def reading(scheduler: GPUJobScheduler, index: int) -> dict[str, Any] | None:
    """The monitor's latest published reading of one GPU."""
    for gpu in scheduler.get_gpu_status():
        if gpu["index"] == index:
            found: dict[str, Any] | None = gpu["reading"]
            return found
    return None


def check_job_memory(scheduler: GPUJobScheduler, work: Path) -> Check:
    """(b) A gpuq job's memory shows in its GPU's reading; the GPU is not called foreign."""
    name = "(b) gpuq job's memory in the reading"
    baseline = until(lambda: reading(scheduler, 0), MARK_TIMEOUT_S)
    if baseline is None:
        return Check(name, "failed", "GPU 0 published no reading")
    ready, release = work / "b.ready", work / "b.release"
    job = scheduler.client().submit(hold_command(HOLD_MIB, ready, release), gpus=1,
                                    allowed_gpu_ids=[0], name="gpu-check-b",
                                    allow_duplicate=True)
    try:
        if until(ready.exists, START_TIMEOUT_S) is None:
            return Check(name, "failed", f"job {job.id} {job.status}: its memory was never "
                         f"allocated; GPU 0 before it: {baseline}; log: {job.logs()[-300:]!r}")
        want = baseline["memory_used_mb"] + HOLD_MIB * 0.9
        seen = until(lambda: _at_least(reading(scheduler, 0), want), MARK_TIMEOUT_S)
    finally:
        release.touch()
    status = job.wait(timeout_s=60)
    figures = (f"baseline {baseline['memory_used_mb']} MiB, with the job "
               f"{seen['memory_used_mb'] if seen else '?'} MiB, job {status}")
    if seen is None:
        return Check(name, "failed", f"{figures}: the reading never showed {HOLD_MIB} MiB more")
    if seen["foreign"]:
        return Check(name, "failed", f"{figures}: the GPU gpuq holds was marked foreign")
    return Check(name, "held" if status == "SUCCEEDED" else "failed", f"{figures}, not foreign")


def _at_least(found: dict[str, Any] | None, memory_mb: float) -> dict[str, Any] | None:
    return found if found and found["memory_used_mb"] >= memory_mb else None


def check_foreign(scheduler: GPUJobScheduler, work: Path, gpus: int) -> Check:
    """(c) A process outside gpuq gets its GPU marked foreign; no job is placed there."""
    name = "(c) foreign process keeps jobs off"
    ready, release = work / "c.ready", work / "c.release"
    mib = max(HOLD_MIB, scheduler.settings.busy_memory_mb + 1024)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    foreign = subprocess.Popen(hold_command(mib, ready, release), env=env,
                               stdin=subprocess.DEVNULL)
    try:
        if until(ready.exists, START_TIMEOUT_S) is None:
            return Check(name, "failed", f"the foreign process never allocated (exit "
                         f"{foreign.poll()})")
        marked = until(lambda: _foreign(reading(scheduler, 0)), MARK_TIMEOUT_S)
        if marked is None:
            return Check(name, "failed", f"GPU 0 not marked foreign with {mib} MiB held "
                         f"outside gpuq: {reading(scheduler, 0)}")
        job = scheduler.client().submit([sys.executable, "-c", "pass"], gpus=1,
                                        name="gpu-check-c", allow_duplicate=True)
        if gpus == 1:
            return _stays_pending(job, release, foreign, marked["memory_used_mb"])
        status = job.wait(timeout_s=60)
        gpu_ids = job.row()["gpu_ids"]
        figures = f"GPU 0 foreign at {marked['memory_used_mb']} MiB; job {status} on {gpu_ids}"
        placed_well = status == "SUCCEEDED" and 0 not in (gpu_ids or [])
        return Check(name, "held" if placed_well else "failed", figures)
    finally:
        release.touch()
        foreign.wait(timeout=30)


def _foreign(found: dict[str, Any] | None) -> dict[str, Any] | None:
    return found if found and found["foreign"] else None


def _stays_pending(job: Any, release: Path, foreign: subprocess.Popen[bytes],
                   memory_mb: int) -> Check:
    """One GPU: the job waits while the foreign process lives, then runs once it is gone."""
    name = "(c) foreign process keeps jobs off"
    time.sleep(PENDING_FOR_S)
    waited = job.status
    release.touch()
    foreign.wait(timeout=30)
    status = job.wait(timeout_s=60)
    figures = (f"GPU 0 foreign at {memory_mb} MiB; job {waited} for {PENDING_FOR_S:.0f} s, "
               f"then {status} on {job.row()['gpu_ids']} once the process ended")
    held = waited == "PENDING" and status == "SUCCEEDED"
    return Check(name, "held" if held else "failed", figures)


def check_nccl(scheduler: GPUJobScheduler, gpus: int) -> Check:
    """(d) A 2-GPU job with the NCCL preflight succeeds."""
    name = "(d) 2-GPU job, --preflight nccl"
    if gpus < 2:
        return Check(name, "skipped", f"{gpus} GPU on this host")
    job = scheduler.client().submit([sys.executable, "-c", "pass"], gpus=2,
                                    preflight="nccl", name="gpu-check-d",
                                    allow_duplicate=True)
    status = job.wait(timeout_s=240)
    said = [line for line in job.logs().splitlines() if "preflight nccl" in line]
    detail = f"job {status} on {job.row()['gpu_ids']}: {said[-1] if said else 'no preflight'}"
    # A skipped preflight lets the job run, but then NCCL was not tried.
    passed = status == "SUCCEEDED" and any("preflight nccl passed" in line for line in said)
    return Check(name, "held" if passed else "failed", detail)


# -- running it ---------------------------------------------------------------------------

def find_driver() -> tuple[NvmlProvider | None, str]:
    """NVML's provider, or None and why there is nothing to check."""
    if shutil.which("nvidia-smi") is None:
        return None, "no NVIDIA driver here (no nvidia-smi on PATH)"
    try:
        provider = NvmlProvider()
    except Exception as e:  # NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ImportError
        return None, f"no NVIDIA driver here (NVML did not start: {e})"
    if provider.count == 0:
        return None, "the NVIDIA driver sees no GPU"
    return provider, ""


def guarded(name: str, check: Callable[[], Check]) -> Check:
    """A check whose error is its failure, not the end of the run."""
    try:
        return check()
    except Exception as e:
        return Check(name, "failed", f"{type(e).__name__}: {e}")


def run_checks(provider: NvmlProvider, work: Path) -> list[Check]:
    checks = [guarded("(a) NVML readings = nvidia-smi", lambda: check_readings(provider))]
    try:
        scheduler = start_stack(work / "home", min(provider.count, 2))
    except Exception as e:
        return [*checks, Check("gpuq stack", "failed", f"did not start: {e}")]
    try:
        checks.append(guarded("(b) gpuq job's memory in the reading",
                              lambda: check_job_memory(scheduler, work)))
        checks.append(guarded("(c) foreign process keeps jobs off",
                              lambda: check_foreign(scheduler, work, provider.count)))
        checks.append(guarded("(d) 2-GPU job, --preflight nccl",
                              lambda: check_nccl(scheduler, provider.count)))
    finally:
        scheduler.stop()
    return checks


def print_table(checks: list[Check]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="gpu-check")
    for column in ("check", "result", "figures"):
        table.add_column(column)
    colour = {"held": "green", "failed": "red", "skipped": "yellow"}
    for check in checks:
        table.add_row(check.name, f"[{colour[check.status]}]{check.status}[/]", check.detail)
    Console(width=max(shutil.get_terminal_size().columns, 160)).print(table)


def main(argv: list[str]) -> int:
    if argv[:1] == ["hold"]:
        return hold(int(argv[1]), Path(argv[2]), Path(argv[3]))
    provider, why_not = find_driver()
    if provider is None:
        print(f"gpu-check: {why_not}; nothing checked")
        return 0
    work = Path(tempfile.mkdtemp(prefix="gpuq-gpu-check-"))
    checks = run_checks(provider, work)
    print_table(checks)
    if any(c.status == "failed" for c in checks):
        print(f"gpu-check: failed; the stack's logs are under {work}")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
