"""`make gpu-check` where there is no driver, and its comparison of the monitor's readings
with nvidia-smi's (the checks that need GPUs run only on a GPU host)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app.cli.gpu_check import compare_gpu, compare_readings, parse_smi
from scheduler.worker.monitor import GpuReading, NvmlProvider
from tests.support.servers import ROOT

H100_TOTAL_MB = 81559


def gpu(index: int = 0, used: int = 0, total: int = H100_TOTAL_MB, util: int = 0) -> GpuReading:
    return GpuReading(index, "made up", used, total, util)


def test_without_a_driver_it_says_so_in_one_line_and_exits_0(tmp_path):
    # Given a PATH with no nvidia-smi on it
    env = {"PATH": str(tmp_path), "PYTHONPATH": str(ROOT)}
    # When the check runs
    done = subprocess.run([sys.executable, "-m", "app.cli.gpu_check"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    # Then it says there is no driver, and nothing fails
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "gpu-check: no NVIDIA driver here (no nvidia-smi on PATH); nothing checked"]


def nvml_works() -> bool:
    try:
        NvmlProvider()
    except Exception:
        return False
    return True


@pytest.mark.skipif(nvml_works(), reason="NVML works here: the check would really run")
def test_an_nvidia_smi_without_a_working_nvml_is_no_driver_either(tmp_path):
    # Given an nvidia-smi on PATH but no NVIDIA library (as on this machine)
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit 9\n")
    smi.chmod(0o755)
    env = {"PATH": str(tmp_path), "PYTHONPATH": str(ROOT), "LD_LIBRARY_PATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "app.cli.gpu_check"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    assert line.startswith("gpu-check: no NVIDIA driver here (NVML did not start: ")


def test_nvidia_smi_csv_lines_become_readings():
    readings = parse_smi("0, 512, 81559, 3\n1, 0, 81559, [N/A]\n")
    assert [(g.index, g.memory_used_mb, g.memory_total_mb, g.utilization_pct)
            for g in readings] == [(0, 512, 81559, 3), (1, 0, 81559, -1)]


def test_readings_within_tolerance_agree():
    assert compare_gpu(gpu(used=2600, util=40), gpu(used=2500, util=55)) == []
    # 5 % of a large use is more than the 256 MiB floor
    assert compare_gpu(gpu(used=40_000), gpu(used=38_500)) == []
    # a total one MiB apart is rounding
    assert compare_gpu(gpu(total=81560), gpu(total=81559)) == []


def test_used_memory_beyond_tolerance_is_a_problem():
    problems = compare_gpu(gpu(used=3000), gpu(used=2500))
    assert len(problems) == 1 and problems[0].startswith("used 3000")


def test_memory_the_driver_reserves_explains_the_gap():
    # NVML's v1 `used` counts the reserved memory, recent nvidia-smi does not
    assert compare_gpu(gpu(used=600), gpu(used=0), reserved_mb=550) == []
    assert compare_gpu(gpu(used=600), gpu(used=600), reserved_mb=550) == []
    assert compare_gpu(gpu(used=1600), gpu(used=0), reserved_mb=550) != []


def test_a_different_total_or_utilisation_is_a_problem():
    assert compare_gpu(gpu(total=80000), gpu()) == ["total 80000 vs 81559 MiB"]
    assert compare_gpu(gpu(util=90), gpu(util=10)) == ["utilisation 90 vs 10 %"]
    # where nvidia-smi reports no utilisation there is nothing to compare
    assert compare_gpu(gpu(util=90), gpu(util=-1)) == []


def test_the_whole_check_names_each_gpu_that_differs():
    held = compare_readings([gpu(0, used=10), gpu(1, used=20)], [gpu(0, used=0), gpu(1)])
    assert held.status == "held"
    assert "GPU0 used 10/0" in held.detail and "GPU1 used 20/0" in held.detail
    failed = compare_readings([gpu(0), gpu(1, used=5000)], [gpu(0), gpu(1)])
    assert failed.status == "failed"
    assert failed.detail.startswith("GPU1: used 5000")


def test_a_gpu_that_only_one_side_sees_fails_the_check():
    check = compare_readings([gpu(0), gpu(1)], [gpu(0)])
    assert check.status == "failed" and "[0, 1] (NVML) vs [0] (nvidia-smi)" in check.detail
