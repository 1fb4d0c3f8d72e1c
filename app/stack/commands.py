"""Every server command line gpuq starts: the Celery workers of a host (one per GPU, one
for 0-GPU jobs), the control worker, beat and Flower. Each runs this interpreter, so that a
server is always the gpuq that started it."""

from __future__ import annotations

import shlex
import sys

from app.core.keys import CONTROL_QUEUE, CPU_QUEUE, gpu_queue
from app.core.settings import Settings
from app.stack.supervisor import Program

# Beyond the kill grace, what a stopping worker needs: record how each job ended (with the
# database's own retries), release its GPUs, and let Celery close down.
WORKER_STOP_MARGIN_S = 30.0
# Beyond its workers' stop, what `gpuq worker` needs: settle the jobs of a worker it had to
# kill, then kill what is left of its tree.
HOST_STOP_MARGIN_S = 30.0


def worker_stop_timeout_s(settings: Settings) -> float:
    """How long a GPU or CPU worker may take to stop after SIGTERM: it stops its job
    (SIGTERM, SIGKILL after the kill grace) and records how it ended."""
    return settings.kill_grace_s + WORKER_STOP_MARGIN_S


def host_stop_timeout_s(settings: Settings) -> float:
    """How long `gpuq worker` may take to stop after SIGTERM."""
    return worker_stop_timeout_s(settings) + HOST_STOP_MARGIN_S


def is_host_worker(command: str) -> bool:
    """A Procfile command that runs `gpuq worker` (this host's GPU workers)."""
    words = command.split()
    return len(words) >= 2 and words[0].rsplit("/", 1)[-1] == "gpuq" and words[1] == "worker"


def celery_command(settings: Settings, *args: str) -> str:
    """A command line for /bin/sh (the supervisor's) or shlex.split (`gpuq beat`): each word
    quoted, so that an interpreter or a GPUQ_HOME with a space in its path stays one word."""
    return shlex.join([sys.executable, "-m", "celery", "-A", "tasks.worker_app", *args])


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
                env={"GPUQ_WORKER_GPU": str(i)}, stop_timeout_s=worker_stop_timeout_s(settings))
        for i in range(gpu_count)
    ]
    if settings.cpu_slots:
        programs.append(Program("cpu", worker_command(settings, "cpu", CPU_QUEUE, "threads",
                                                      settings.cpu_slots),
                                stop_timeout_s=worker_stop_timeout_s(settings)))
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
