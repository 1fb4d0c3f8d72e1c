"""Celery task entry points only; each calls into app/ or scheduler/."""
