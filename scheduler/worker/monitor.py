"""GPU readings: NVML through nvidia-ml-py, or a fake provider when there is no driver."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from app.core.errors import GpuqError
from app.core.settings import Settings

log = logging.getLogger(__name__)

# GPUs a host pretends to have when NVML is unavailable and GPUQ_FAKE_GPUS is unset.
DEFAULT_FAKE_GPUS = 4
FAKE_STATE_FILE = "fake-gpus.json"


@dataclass
class GpuReading:
    index: int
    name: str
    memory_used_mb: int
    memory_total_mb: int
    utilization_pct: int
    process_count: int = 0
    mig: bool = False  # MIG mode on: gpuq hands out whole GPUs only
    # [pid, MB] of each compute process NVML lists (MB None where it cannot tell): what an
    # attempt's figures count of its own processes (scheduler/worker/figures.py).
    processes: list[list[int | None]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_busy(reading: GpuReading, settings: Settings) -> bool:
    """Whether a GPU that gpuq does not hold is used by someone else."""
    return (reading.memory_used_mb > settings.busy_memory_mb
            or reading.utilization_pct > settings.busy_utilization_pct)


class GpuProvider(Protocol):
    kind: str

    def readings(self) -> list[GpuReading]: ...


@dataclass
class FakeProvider:
    """A settable stand-in for NVML: count, memory, utilisation and foreign use.

    Foreign use can be set in process (`set_foreign_use`) or, for worker processes, in a
    JSON file beside the data (`write_fake_foreign_use`), read at every reading."""

    count: int
    memory_total_mb: int = 81920
    name: str = "Fake GPU"
    state_file: Path | None = None
    kind: str = "fake"
    foreign: dict[int, tuple[int, int]] = field(default_factory=dict)

    def set_foreign_use(self, index: int, memory_used_mb: int, utilization_pct: int) -> None:
        self.foreign[index] = (memory_used_mb, utilization_pct)

    def _current_foreign(self) -> dict[int, tuple[int, int]]:
        usage = dict(self.foreign)
        if self.state_file is not None and self.state_file.exists():
            for index, (mem, util) in json.loads(self.state_file.read_text()).items():
                usage[int(index)] = (int(mem), int(util))
        return usage

    def readings(self) -> list[GpuReading]:
        usage = self._current_foreign()
        out = []
        for index in range(self.count):
            used_mb, util_pct = usage.get(index, (0, 0))
            out.append(GpuReading(index, self.name, used_mb, self.memory_total_mb, util_pct,
                                  process_count=int(used_mb > 0 or util_pct > 0)))
        return out


def write_fake_foreign_use(home: Path, index: int, memory_used_mb: int,
                           utilization_pct: int) -> None:
    """Pretend a process uses a fake GPU (0, 0 clears it): on a GPU that gpuq does not
    hold, use by someone else (the GPU is then busy); on one it holds, the job's own use,
    which its reading shows unmarked and its attempt's figures count."""
    path = home / FAKE_STATE_FILE
    state = json.loads(path.read_text()) if path.exists() else {}
    state[str(index)] = [memory_used_mb, utilization_pct]
    path.write_text(json.dumps(state))


class NvmlProvider:
    """Readings from the NVIDIA driver. Raises on construction when NVML is unusable."""

    kind = "nvml"

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self.count = pynvml.nvmlDeviceGetCount()
        self._mig_reported: set[int] = set()

    def _mig_enabled(self, handle: Any, index: int) -> bool:
        nvml = self._nvml
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError:  # not a MIG-capable GPU
            return False
        enabled = bool(current == nvml.NVML_DEVICE_MIG_ENABLE)
        if enabled and index not in self._mig_reported:
            self._mig_reported.add(index)
            log.warning("GPU %d has MIG enabled: gpuq schedules whole GPUs; MIG instances "
                        "are not supported", index)
        return enabled

    def readings(self) -> list[GpuReading]:
        nvml = self._nvml
        out = []
        for index in range(self.count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            util = nvml.nvmlDeviceGetUtilizationRates(handle)
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            name = nvml.nvmlDeviceGetName(handle)
            out.append(GpuReading(
                index=index,
                name=name.decode() if isinstance(name, bytes) else str(name),
                memory_used_mb=int(memory.used) // 2**20,
                memory_total_mb=int(memory.total) // 2**20,
                utilization_pct=int(util.gpu),
                process_count=len(processes),
                mig=self._mig_enabled(handle, index),
                processes=_process_memory(processes),
            ))
        return out


def _process_memory(processes: list[Any]) -> list[list[int | None]]:
    """[pid, MB] of NVML's process records; usedGpuMemory is None (or NVML's
    NOT_AVAILABLE, beyond any card's memory) where the driver does not say."""
    out: list[list[int | None]] = []
    for process in processes[:MAX_PROCESSES]:
        pid, used = getattr(process, "pid", None), getattr(process, "usedGpuMemory", None)
        if pid is None:
            continue
        mb = used // 2**20 if isinstance(used, int) and 0 <= used < 2**50 else None
        out.append([int(pid), mb])
    return out


MAX_PROCESSES = 64  # of one GPU's, kept in its reading
NVIDIA_CONTROL_DEVICE = "/dev/nvidiactl"


def detect_provider(settings: Settings) -> GpuProvider:
    """NVML when it works, else fake GPUs; GPUQ_FAKE_GPUS forces the fake provider."""
    state_file = settings.home / FAKE_STATE_FILE
    if settings.fake_gpus is not None:
        log.info("using %d fake GPUs (GPUQ_FAKE_GPUS is set)", settings.fake_gpus)
        return FakeProvider(settings.fake_gpus, state_file=state_file)
    try:
        return NvmlProvider()
    except Exception as e:  # NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ImportError
        if has_nvidia_driver():
            # A GPU host whose NVML fails must not quietly serve made-up GPUs instead.
            raise GpuqError(
                f"this host has an NVIDIA driver but NVML failed: {e}; fix the driver "
                "(nvidia-smi must work) or set GPUQ_FAKE_GPUS=N to run on fake GPUs") from e
        log.warning("no NVIDIA driver (%s); using %d fake GPUs, set GPUQ_FAKE_GPUS to change",
                    e, DEFAULT_FAKE_GPUS)
        return FakeProvider(DEFAULT_FAKE_GPUS, state_file=state_file)


def has_nvidia_driver() -> bool:
    """Whether an NVIDIA kernel driver is loaded here (its control device exists)."""
    return Path(NVIDIA_CONTROL_DEVICE).exists()
