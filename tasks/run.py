"""`gpuq.run`: one attempt of a job, on the worker of the GPU it was routed to."""

from __future__ import annotations

from celery import Celery

from app.runtime import Runtime


def register(celery: Celery, rt: Runtime) -> None:
    @celery.task(name="gpuq.run", ignore_result=True)
    def run(job_id: int, attempt: int) -> str:
        from scheduler.worker.attempt import run_attempt

        return run_attempt(rt, job_id, attempt)
