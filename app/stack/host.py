"""`gpuq worker`: register this host's GPUs and keep one Celery worker per GPU running."""

from __future__ import annotations

import logging

from app.core.settings import Settings
from app.runtime import Runtime
from app.stack.commands import gpu_worker_programs
from app.stack.supervisor import Supervisor
from app.store import cluster
from app.store.exits import RestartLog
from scheduler.worker.monitor import GpuProvider, detect_provider

log = logging.getLogger(__name__)


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
