"""The operations layer: plain functions in one registry, called locally or over Celery.

`call_local` runs one by name, importing only the module it lives in (app/ops/registry.py):
this package's face imports nothing, so that a command pays for its own operation only.
"""
