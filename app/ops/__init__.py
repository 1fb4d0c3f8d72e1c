"""The operations layer: plain functions in one registry, called locally or over Celery."""
