"""The planner: what a dispatch pass decides, one concept a module.

candidates (the PENDING jobs a pass reads, in order), order (fair share and GPU limits),
fit (which GPUs a job may take now), reservations (when a blocked job will start and which
GPUs it will take; the backfill rule). scheduler/dispatch/allocator.py runs the pass and
routes what it places. This face imports nothing: import the module you need.
"""
