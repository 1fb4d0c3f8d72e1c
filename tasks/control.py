"""`gpuq.op`, `gpuq.dispatch`, `gpuq.reconcile` and `gpuq.prune`: the operations layer and
the periodic repairs as tasks on the control queue."""

from __future__ import annotations

from typing import Any

from celery import Celery

from app.core.errors import GpuqError
from app.ops.registry import call_local
from app.runtime import Runtime


def register(celery: Celery, rt: Runtime) -> None:
    @celery.task(name="gpuq.op", ignore_result=False)
    def op(name: object = None, kwargs: object = None) -> dict[str, Any]:
        # Errors travel as an envelope, not as a pickled exception: JSON only on the broker.
        try:
            return {"ok": True, "value": call_local(rt, name, kwargs)}
        except GpuqError as e:
            return {"ok": False, "code": e.code, "message": str(e)}

    @celery.task(name="gpuq.reconcile", ignore_result=True)
    def reconcile() -> dict[str, list[int]]:
        from scheduler.dispatch.reconcile import reconcile as repair

        return repair(rt)

    @celery.task(name="gpuq.prune", ignore_result=True)
    def prune() -> int:
        from scheduler.dispatch.reconcile import prune_finished_jobs

        return prune_finished_jobs(rt)

    @celery.task(name="gpuq.dispatch", ignore_result=True)
    def dispatch() -> int:
        from scheduler.dispatch.allocator import Dispatcher

        return Dispatcher(rt).dispatch()
