"""`gpuq worker`: register this host's GPUs and keep one Celery worker per GPU running."""

from __future__ import annotations

import logging
import sys

from app.core.keys import CONTROL_QUEUE, CPU_QUEUE, gpu_queue
from app.core.settings import Settings
from app.runtime import Runtime
from app.stack.supervisor import Program, Supervisor
from app.store import cluster
from app.store.exits import RestartLog
from scheduler.worker.monitor import GpuProvider, detect_provider

log = logging.getLogger(__name__)


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


def register_host(rt: Runtime, provider: GpuProvider, host: str, limit: int | None = None
                  ) -> int:
    """Publish a host's GPU inventory (its first `limit` GPUs); return how many."""
    readings = provider.readings()[:limit]
    cluster.register_host(rt.redis, host, {
        g.index: {"name": g.name, "memory_total_mb": g.memory_total_mb, "provider": provider.kind}
        for g in readings})
    return len(readings)


def run_host_workers(settings: Settings) -> None:
    from app.core.security import warn_without_secret

    warn_without_secret(settings)  # once for the host, not once per GPU worker
    rt = Runtime(settings, wait_for_broker=True)
    rt.check_database()  # refused here in one line, not by every GPU worker in a loop
    count = register_host(rt, detect_provider(settings), settings.hostname)
    log.info("host %s: %d GPU workers", settings.hostname, count)
    Supervisor(gpu_worker_programs(settings, count),
               on_exit=RestartLog(lambda: rt.redis, settings.hostname)).run_forever()
