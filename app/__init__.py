"""gpuq: a GPU job queue on Celery and Redis."""
