"""The monitor: NVML code and its error paths, the fake provider, and the busy rule as the
dispatcher applies it (real Redis, real database)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pynvml
import pytest

from app.core import keys
from app.core.settings import Settings
from app.stack.host import register_host
from scheduler.dispatch.allocator import Dispatcher
from scheduler.worker.heartbeat import Heartbeat
from scheduler.worker.monitor import (
    FakeProvider,
    GpuReading,
    NvmlProvider,
    detect_provider,
    is_busy,
    write_fake_foreign_use,
)


def test_without_a_driver_the_fake_provider_is_used_with_one_log_line(tmp_path, caplog):
    # This machine has no NVIDIA library: the real nvmlInit fails and we fall back.
    settings = Settings(home=tmp_path, fake_gpus=None, _env_file=None)
    with caplog.at_level(logging.WARNING, logger="scheduler.worker.monitor"):
        provider = detect_provider(settings)
    assert provider.kind == "fake" and len(provider.readings()) == 4
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no NVIDIA driver" in lines[0] and "GPUQ_FAKE_GPUS" in lines[0]


def test_a_driver_whose_nvml_fails_is_refused_not_replaced_by_fake_gpus(tmp_path, monkeypatch):
    # Given a host with an NVIDIA driver's control device but an NVML that fails to start
    import pytest

    from app.core.errors import GpuqError
    from scheduler.worker import monitor

    device = tmp_path / "nvidiactl"
    device.touch()
    monkeypatch.setattr(monitor, "NVIDIA_CONTROL_DEVICE", str(device))
    settings = Settings(home=tmp_path, fake_gpus=None, _env_file=None)
    # Then the worker refuses to start, naming both ways out
    with pytest.raises(GpuqError, match=r"NVML failed.*nvidia-smi.*GPUQ_FAKE_GPUS"):
        detect_provider(settings)


def test_driver_not_loaded_falls_back_too(tmp_path, monkeypatch):
    def not_loaded() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", not_loaded)
    provider = detect_provider(Settings(home=tmp_path, fake_gpus=None, _env_file=None))
    assert provider.kind == "fake"


def test_fake_gpus_setting_wins_over_nvml(tmp_path):
    provider = detect_provider(Settings(home=tmp_path, fake_gpus=8, _env_file=None))
    assert provider.kind == "fake" and len(provider.readings()) == 8


def test_nvml_readings_come_from_the_driver_calls(monkeypatch, caplog):
    """The NVML code path with the driver's answers stood in for (no GPU here)."""
    calls = {
        "nvmlInit": lambda: None,
        "nvmlDeviceGetCount": lambda: 2,
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(used=(h + 1) * 2**30,
                                                             total=80 * 2**30),
        "nvmlDeviceGetUtilizationRates": lambda h: SimpleNamespace(gpu=10 * h),
        "nvmlDeviceGetComputeRunningProcesses": lambda h: [object()] * h,
        "nvmlDeviceGetName": lambda h: b"NVIDIA H100",
        "nvmlDeviceGetMigMode": lambda h: (pynvml.NVML_DEVICE_MIG_ENABLE if h else 0, 0),
    }
    for name, fn in calls.items():
        monkeypatch.setattr(pynvml, name, fn)
    provider = NvmlProvider()
    with caplog.at_level(logging.WARNING, logger="scheduler.worker.monitor"):
        readings = provider.readings()
        provider.readings()
    assert readings == [
        GpuReading(0, "NVIDIA H100", 1024, 81920, 0, 0, mig=False),
        GpuReading(1, "NVIDIA H100", 2048, 81920, 10, 1, mig=True),
    ]
    mig_lines = [r for r in caplog.records if "MIG" in r.getMessage()]
    assert len(mig_lines) == 1, "MIG is reported once per GPU, not at every reading"


def test_fake_foreign_use_is_read_from_the_state_file(tmp_path):
    provider = FakeProvider(2, state_file=tmp_path / "fake-gpus.json")
    write_fake_foreign_use(tmp_path, 1, 4096, 50)
    assert [(r.memory_used_mb, r.utilization_pct) for r in provider.readings()] == [
        (0, 0), (4096, 50)]
    write_fake_foreign_use(tmp_path, 1, 0, 0)
    assert provider.readings()[1].memory_used_mb == 0


@pytest.mark.parametrize(("memory_mb", "util_pct", "busy"), [
    (0, 0, False), (1024, 10, False), (1025, 0, True), (0, 11, True)])
def test_busy_thresholds(memory_mb, util_pct, busy):
    settings = Settings(busy_memory_mb=1024, busy_utilization_pct=10, _env_file=None)
    assert is_busy(GpuReading(0, "g", memory_mb, 81920, util_pct), settings) is busy


def test_gpu_used_by_a_foreign_process_is_not_handed_out(rt, local):
    provider = FakeProvider(2)
    register_host(rt, provider, rt.settings.hostname)
    provider.set_foreign_use(0, 30_000, 90)
    beats = [Heartbeat(rt, i, provider) for i in range(2)]
    for beat in beats:
        beat.beat()
    reading = json.loads(rt.redis.get(keys.reading(rt.settings.hostname, 0)))
    assert reading["foreign"] is True and reading["memory_used_mb"] == 30_000
    jobs = [local.submit(f"echo {n}") for n in range(2)]
    Dispatcher(rt).dispatch()
    assert [j.row()["gpu_ids"] for j in jobs] == [[1], None]
    status = local.call("status")["hosts"][0]["gpus"]
    assert [g["reading"]["foreign"] for g in status] == [True, False]


def test_gpu_held_by_gpuq_is_never_called_foreign(rt, local):
    provider = FakeProvider(1)
    register_host(rt, provider, rt.settings.hostname)
    beat = Heartbeat(rt, 0, provider)
    beat.beat()
    job = local.submit("train")
    Dispatcher(rt).dispatch()
    assert job.row()["gpu_ids"] == [0]
    provider.set_foreign_use(0, 30_000, 90)  # the job's own use shows up
    beat.publish_reading()
    assert json.loads(rt.redis.get(keys.reading(rt.settings.hostname, 0)))["foreign"] is False


def test_a_dispatch_request_left_by_a_client_is_served_by_a_heartbeat(rt, local):
    """A client's dispatch returns after a bounded number of passes; what it leaves
    flagged is picked up by a GPU worker's heartbeat thread, with no control worker."""
    import time

    provider = FakeProvider(1)
    register_host(rt, provider, rt.settings.hostname)
    beat = Heartbeat(rt, 0, provider)
    beat.beat()
    rt.redis.set(keys.hold(rt.settings.hostname, 0), "other.1", ex=60)  # the GPU is busy
    job = local.submit("echo waiting")
    assert job.status == "PENDING"
    rt.redis.delete(keys.hold(rt.settings.hostname, 0))
    rt.redis.set(keys.DISPATCH_DIRTY, 1)  # GPU free, but nobody ran a pass since
    beat._thread.start()
    try:
        deadline = time.monotonic() + 5
        while job.status == "PENDING" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.status == "STARTING"
    finally:
        beat._stop.set()
        beat._thread.join()
