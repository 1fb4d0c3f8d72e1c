"""Every server command line gpuq starts: the Celery workers of a host (one per GPU, one
for 0-GPU jobs), the control worker, beat and Flower. Each runs this interpreter, so that a
server is always the gpuq that started it."""

from __future__ import annotations

import sys

from app.core.keys import CONTROL_QUEUE, CPU_QUEUE, gpu_queue
from app.core.settings import Settings
from app.stack.supervisor import Program


def celery_command(settings: Settings, *args: str) -> str:
    return " ".join([sys.executable, "-m", "celery", "-A", "tasks.worker_app", *args])


def worker_command(settings: Settings, name: str, queue: str, pool: str, concurrency: int) -> str:
    return celery_command(
        settings, "worker", "-P", pool, "-c", str(concurrency), "-Q", queue,
        "-n", f"{name}@{settings.hostname}", "--without-gossip", "--without-mingle",
        "-l", settings.log_level,
    )


def gpu_worker_programs(settings: Settings, gpu_count: int) -> list[Program]:
    """One solo-pool worker per GPU, plus a small thread pool for 0-GPU jobs."""
    programs = [
        Program(f"gpu{i}", worker_command(settings, f"gpu{i}", gpu_queue(settings.hostname, i),
                                          "solo", 1),
                env={"GPUQ_WORKER_GPU": str(i)})
        for i in range(gpu_count)
    ]
    if settings.cpu_slots:
        programs.append(Program("cpu", worker_command(settings, "cpu", CPU_QUEUE, "threads",
                                                      settings.cpu_slots)))
    return programs


def control_worker_command(settings: Settings) -> str:
    return worker_command(settings, "control", CONTROL_QUEUE, "threads", 4)


def beat_command(settings: Settings) -> str:
    settings.home.mkdir(parents=True, exist_ok=True)
    schedule = (settings.home / "beat-schedule").resolve()
    return celery_command(settings, "beat", "-s", str(schedule), "-l", settings.log_level)


def flower_command(settings: Settings) -> str:
    return celery_command(settings, "flower", f"--address={settings.flower_address}",
                          f"--port={settings.flower_port}")
