"""`gpuq.op`, `gpuq.dispatch`, `gpuq.reconcile` and `gpuq.prune`: the operations layer and
the periodic repairs as tasks on the control queue."""

from __future__ import annotations

from typing import Any

from celery import Celery

from app.core import signing
from app.core.errors import GpuqError, MessageNotAuthentic
from app.core.identity import Actor
from app.ops.registry import call_local
from app.runtime import Runtime


def _accepted(rt: Runtime, name: object, kwargs: object, auth: object
              ) -> tuple[object, Actor | None]:
    """An operation's arguments and its actor, once its message is authentic: with
    GPUQ_SECRET set (or a signed message), only a signed, fresh, first-seen message runs,
    for the actor it names (holders of the secret are the service: the dashboard sends a
    named user's operations so); without, the message is taken as it comes, for the stack's
    owner."""
    if not rt.settings.secret and auth is None:
        return kwargs, None
    actor, arguments = signing.verify_op(rt.redis, rt.settings.secret, name, auth)
    if kwargs is not None:
        raise MessageNotAuthentic(f"{signing.OP_PURPOSE} message refused: arguments outside "
                                  "its signature")
    return arguments, actor


def register(celery: Celery, rt: Runtime) -> None:
    @celery.task(name="gpuq.op", ignore_result=False)
    def op(name: object = None, kwargs: object = None, auth: object = None) -> dict[str, Any]:
        # Errors travel as an envelope, not as a pickled exception: JSON only on the broker.
        try:
            return {"ok": True, "value": call_local(rt, name, *_accepted(rt, name, kwargs,
                                                                          auth))}
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
