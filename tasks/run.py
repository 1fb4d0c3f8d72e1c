"""`gpuq.run`: one attempt of a job, on the worker of the GPU it was routed to."""

from __future__ import annotations

import logging

from celery import Celery

from app.core import signing
from app.core.errors import MessageNotAuthentic
from app.runtime import Runtime

log = logging.getLogger(__name__)


def register(celery: Celery, rt: Runtime) -> None:
    @celery.task(name="gpuq.run", ignore_result=True)
    def run(job_id: int, attempt: int, auth: object = None) -> str:
        """With GPUQ_SECRET set, only a run message the dispatcher signed for this (job id,
        attempt) runs (app/core/signing.py: `verify_run` says why it needs no time window);
        any other is refused, and nothing of the job is touched."""
        if rt.settings.secret or auth is not None:
            try:
                signing.verify_run(rt.settings.secret, job_id, attempt, auth)
            except MessageNotAuthentic as e:
                return f"refused: {e}"
        from scheduler.worker.attempt import run_attempt

        return run_attempt(rt, job_id, attempt)
