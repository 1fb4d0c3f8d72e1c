"""GPU readings: NVML through nvidia-ml-py, or a fake provider when there is no driver."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from app.settings import Settings

log = logging.getLogger(__name__)

# GPUs a host pretends to have when NVML is unavailable and GPUQ_FAKE_GPUS is unset.
DEFAULT_FAKE_GPUS = 4


@dataclass
class GpuReading:
    index: int
    name: str
    memory_used_mb: int
    memory_total_mb: int
    utilization_pct: int
    process_count: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class GpuProvider(Protocol):
    kind: str

    def readings(self) -> list[GpuReading]: ...


@dataclass
class FakeProvider:
    """A settable stand-in for NVML: count, memory, utilisation and foreign use."""

    count: int
    memory_total_mb: int = 81920
    name: str = "Fake GPU"
    kind: str = "fake"
    foreign: dict[int, tuple[int, int]] = field(default_factory=dict)

    def set_foreign_use(self, index: int, memory_used_mb: int, utilization_pct: int) -> None:
        self.foreign[index] = (memory_used_mb, utilization_pct)

    def readings(self) -> list[GpuReading]:
        out = []
        for index in range(self.count):
            used_mb, util_pct = self.foreign.get(index, (0, 0))
            out.append(GpuReading(index, self.name, used_mb, self.memory_total_mb, util_pct,
                                  process_count=int(index in self.foreign)))
        return out


class NvmlProvider:
    """Readings from the NVIDIA driver. Raises on construction when NVML is unusable."""

    kind = "nvml"

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self.count = pynvml.nvmlDeviceGetCount()

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
            ))
        return out


def detect_provider(settings: Settings) -> GpuProvider:
    """NVML when it works, else fake GPUs; GPUQ_FAKE_GPUS forces the fake provider."""
    if settings.fake_gpus is not None:
        log.info("using %d fake GPUs (GPUQ_FAKE_GPUS is set)", settings.fake_gpus)
        return FakeProvider(settings.fake_gpus)
    try:
        return NvmlProvider()
    except Exception as e:  # NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ImportError...
        log.warning("NVML unavailable (%s); using %d fake GPUs, set GPUQ_FAKE_GPUS to change",
                    e, DEFAULT_FAKE_GPUS)
        return FakeProvider(DEFAULT_FAKE_GPUS)
