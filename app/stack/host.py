"""`gpuq worker`: register this host's GPUs and keep one Celery worker per GPU running.

One per host: it holds the host lock (app/stack/hostlock.py) for its life. On SIGINT or
SIGTERM it stops its workers (each stops its job and records how it ended, by the job's
restart policy), settles the jobs of any worker it had to kill, and kills what is left of
its tree: no worker and no job outlives it.
"""

from __future__ import annotations

import logging
import os
import threading

from app.core.procgroup import undumpable
from app.core.settings import Settings
from app.runtime import Runtime
from app.stack import reaper
from app.stack.commands import gpu_worker_programs
from app.stack.hostlock import HostLock
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


def settle_left_jobs(rt: Runtime, gpu_count: int, cpu: bool) -> None:
    """Once every worker of this host is stopped: the jobs still RUNNING here belong to a
    worker that had to be killed. Take its GPUs out of service first (a killed worker's
    liveness key outlives it by a few seconds: nothing may be handed to its GPU meanwhile),
    then stop their process groups and settle them by their restart policy, as a worker
    starting again would."""
    from scheduler.worker.recovery import recover_orphans

    host = rt.settings.hostname
    try:
        for gpu in range(gpu_count):
            cluster.stop_beating(rt.redis, host, gpu)
    except Exception as e:  # Redis away: the keys expire by themselves
        log.warning("GPUs of %s not taken out of service: %s", host, e)
    for gpu in [*range(gpu_count), *([None] if cpu else [])]:
        try:
            recover_orphans(rt, gpu)
        except Exception as e:  # the database or Redis away: the reconciler settles them
            log.warning("jobs left by the worker of %s not settled: %s",
                        "the CPU" if gpu is None else f"GPU {gpu}", e)


def _sweep_files(rt: Runtime, stop: threading.Event) -> None:
    """This host's files of jobs the database pruned go too (app/store/retention.py)."""
    from app.store.retention import sweep_files

    while not stop.wait(rt.settings.prune_interval_s):
        try:
            swept = sweep_files(rt.engine, rt.settings.home,
                                rt.settings.keep_finished_days * 86400)
            if swept:
                log.info("swept the files of %d pruned jobs", swept)
        except Exception:
            log.exception("file sweep failed; trying again next round")


def run_host_workers(settings: Settings) -> None:
    from app.core.security import warn_without_secret

    undumpable()

    lock = HostLock(settings, "gpuq worker")
    fd = lock.acquire()  # before anything starts: a second one for this host is refused
    # Refused without GPUQ_SECRET where Redis is beyond loopback; else a warning, once for
    # the host, not once per GPU worker.
    warn_without_secret(settings)
    rt = Runtime(settings, wait_for_broker=True)
    rt.check_database()  # refused here in one line, not by every GPU worker in a loop
    count = register_host(rt, detect_provider(settings), settings.hostname)
    log.info("host %s: %d GPU workers", settings.hostname, count)
    supervisor = Supervisor(gpu_worker_programs(settings, count),
                            base_env={**os.environ, **lock.child_env()}, pass_fds=(fd,),
                            on_exit=RestartLog(lambda: rt.redis, settings.hostname))
    sweeping = threading.Event()
    if settings.keep_finished_days > 0:
        threading.Thread(target=_sweep_files, args=(rt, sweeping), daemon=True,
                         name="gpuq-file-sweep").start()
    with supervisor.stopped_by_signals():
        try:
            supervisor.supervise()
        finally:
            sweeping.set()
            with reaper.reaping():  # the jobs it kills were adopted by this process
                settle_left_jobs(rt, count, cpu=bool(settings.cpu_slots))
            reaper.sweep()
            rt.close()
