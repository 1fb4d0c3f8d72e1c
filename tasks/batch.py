"""`gpuq.batch.<backend>`: each batch adapter is a Celery task; beat runs its sync."""

from __future__ import annotations

from celery import Celery

from app.core.keys import CONTROL_QUEUE
from app.runtime import Runtime


def register(celery: Celery, rt: Runtime) -> None:
    from app.core.backends import adapter_classes

    for backend, cls in adapter_classes().items():
        adapter = cls()
        adapter.rt = rt
        celery.register_task(adapter)
        celery.conf.beat_schedule[f"batch-{backend}"] = {
            "task": adapter.name, "schedule": adapter.poll_interval_s, "args": ["sync"],
            "options": {"queue": CONTROL_QUEUE, "expires": adapter.poll_interval_s},
        }
