"""One host's GPUs: monitor, allocator, executor, jobs file, preflight, and the facade."""

from scheduler.facade import GPUJobScheduler

__all__ = ["GPUJobScheduler"]
