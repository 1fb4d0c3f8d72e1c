"""The Celery entry point of gpuq's worker, beat and Flower processes (`-A tasks.worker_app`).

This module is the call site that reads Settings for a server process.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery.app import trace as celery_trace
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from app.core.errors import SecretRequired
from app.core.procgroup import undumpable
from app.core.security import require_secret
from app.core.settings import Settings
from app.runtime import Runtime
from tasks import batch, control, run

# Celery logs what each task returned; an operation's answer may be a job's own output (the
# `logs` operation), which may print the job's secrets. Log that a task succeeded, not what
# it returned.
celery_trace.LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"

undumpable()  # a job of the same OS account cannot read this process's environment or memory
settings = Settings()
logging.basicConfig(level=settings.log_level.upper(),
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
try:  # before the broker is reached: no message is taken from a Redis open to others
    require_secret(settings)
except SecretRequired as e:
    raise SystemExit(f"gpuq: {e}") from None
runtime = Runtime(settings, wait_for_broker=True)
celery = runtime.celery
control.register(celery, runtime)
run.register(celery, runtime)
batch.register(celery, runtime)

_heartbeat: Any = None
_watch: Any = None


@worker_ready.connect
def _start_heartbeat(**_: Any) -> None:
    """A GPU worker announces that its GPU may be handed out, then keeps announcing it."""
    global _heartbeat
    gpu = os.environ.get("GPUQ_WORKER_GPU")
    if gpu is None:
        return
    from scheduler.worker.heartbeat import Heartbeat

    _heartbeat = Heartbeat(runtime, int(gpu))
    _heartbeat.start()
    from scheduler.worker import attempt

    attempt.dispatch_in_background = _heartbeat.wake


@worker_ready.connect
def _recover_cpu_orphans(sender: Any = None, **_: Any) -> None:
    """The CPU worker, starting again after dying, settles the 0-GPU jobs it left, then
    offers its slots."""
    global _heartbeat
    if str(getattr(sender, "hostname", "")).startswith("cpu@"):
        from scheduler.worker.heartbeat import CpuHeartbeat
        from scheduler.worker.recovery import recover_orphans

        recover_orphans(runtime, None)
        _heartbeat = CpuHeartbeat(runtime, settings.cpu_slots)
        _heartbeat.start()


@worker_ready.connect
def _warn_without_secret(sender: Any = None, **_: Any) -> None:
    """The control worker says it once; a host's GPU workers leave it to `gpuq worker`."""
    if str(getattr(sender, "hostname", "")).startswith("control@"):
        from app.core.security import warn_without_secret

        warn_without_secret(settings)


@worker_ready.connect
def _watch_consumer(sender: Any = None, **_: Any) -> None:
    """Every worker: a consumer that stops taking messages restarts its worker. Connected
    after the other `worker_ready` handlers, so it starts once they have returned: until
    then the worker consumes nothing by design (recovery, a first dispatch)."""
    global _watch
    from scheduler.worker.watchdog import ConsumerWatch

    queues = [q.name for q in getattr(getattr(sender, "task_consumer", None), "queues", [])]
    if not queues:
        return
    _watch = ConsumerWatch(runtime.redis, queues, stall_s=settings.consumer_stall_s,
                           check_s=min(settings.heartbeat_s, settings.consumer_stall_s / 3))
    _watch.start()


@worker_shutting_down.connect
def _stop_running_jobs(**_: Any) -> None:
    """SIGTERM or SIGINT to this worker (its supervisor stopping): its GPU leaves service
    first, so that nothing more is handed to it, then every attempt it runs stops its job
    and records how it ended, by the job's restart policy (scheduler/worker/lease.py).
    Celery's warm shutdown then ends the worker once those attempts returned.

    This runs inside Celery's signal handler, in the thread that may be half-way through
    a Redis call: the heartbeat's own Redis call goes to a thread of its own."""
    from scheduler.worker.lease import request_shutdown

    request_shutdown()
    if _watch is not None:
        _watch.stop()
    if _heartbeat is not None:
        threading.Thread(target=_heartbeat.stop, name="gpuq-heartbeat-stop", daemon=True).start()


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
