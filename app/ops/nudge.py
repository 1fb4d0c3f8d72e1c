"""Nudges: ask the dispatcher, or a batch backend's sync, to act on stored jobs now rather
than on its next periodic turn."""

from __future__ import annotations

import logging

from app.core.keys import CONTROL_QUEUE
from app.runtime import Runtime

log = logging.getLogger(__name__)

def kick_batch(rt: Runtime, backend: str) -> None:
    """Ask the control worker to submit a batch backend's new jobs now."""
    rt.celery.send_task(f"gpuq.batch.{backend}", args=["sync-now"], queue=CONTROL_QUEUE,
                        ignore_result=True)


def kick_dispatch(rt: Runtime) -> None:
    """Route what can start now. The jobs are stored already: a broker hiccup here must not
    report them as refused, so it is logged and the periodic pass routes them later."""
    import redis

    from scheduler.dispatch.allocator import Dispatcher

    try:
        dispatcher = Dispatcher(rt)
        dispatcher.place_head()  # a job that heads the queue starts without waiting its turn
        dispatcher.dispatch(max_passes=2)
    except (redis.RedisError, OSError) as e:
        log.warning("stored, but not routed yet (%s); the periodic dispatch will route it", e)
