"""The Celery app: created here from Settings and a broker URL, imported by name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.core.keys import CONTROL_QUEUE
from app.core.sentinel import SentinelUrl
from app.core.settings import Settings

if TYPE_CHECKING:
    from celery import Celery



def create_celery(settings: Settings, redis_url: str) -> Celery:
    # Imported here: CLI commands that only read the database never pay for Celery.
    from celery import Celery

    from app.core.security import redis_ssl_options

    transport_options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    sentinel = SentinelUrl.parse(redis_url)
    if sentinel is not None:  # kombu's form: one URL per sentinel, the master in options
        redis_url = sentinel.kombu_url()
        transport_options.update(sentinel.transport_options())
    app = Celery("gpuq", broker=redis_url, backend=redis_url, set_as_current=False)
    if sentinel is not None:
        app.conf.update(result_backend_transport_options=sentinel.transport_options())
    ssl_options = redis_ssl_options(redis_url)
    if ssl_options is not None:  # rediss://: Celery wants the TLS options spelt out
        app.conf.update(broker_use_ssl=ssl_options, redis_backend_use_ssl=ssl_options)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=CONTROL_QUEUE,
        task_ignore_result=True,
        result_expires=3600,
        # One job at a time per GPU worker: never hold a second message while one runs.
        worker_prefetch_multiplier=1,
        # Early ack: a message is gone once a worker takes it, so a job that outlives the
        # visibility timeout is never redelivered. The database, not the broker, decides
        # whether an attempt may run, and reconciliation repairs messages lost after ack.
        task_acks_late=False,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # Task events cost every job three extra broker messages; Flower switches them on
        # over the control channel while it runs (its `enable_events` broadcast).
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        beat_schedule={
            "reconcile": {
                "task": "gpuq.reconcile",
                "schedule": settings.reconcile_interval_s,
                "options": {"queue": CONTROL_QUEUE, "expires": settings.reconcile_interval_s},
            },
            "prune": {
                "task": "gpuq.prune",
                "schedule": settings.prune_interval_s,
                "options": {"queue": CONTROL_QUEUE, "expires": settings.prune_interval_s},
            },
            "dispatch": {
                "task": "gpuq.dispatch",
                "schedule": settings.dispatch_interval_s,
                "options": {"queue": CONTROL_QUEUE, "expires": settings.dispatch_interval_s},
            },
        },
    )
    return app
