"""Dispatch and the GPU worker, the watched jobs file, and the GPUJobScheduler facade.

The facade is imported on first use, so that `import scheduler.worker...` costs only what
the worker needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scheduler.facade import GPUJobScheduler

__all__ = ["GPUJobScheduler"]


def __getattr__(name: str) -> Any:
    if name == "GPUJobScheduler":
        from scheduler.facade import GPUJobScheduler

        return GPUJobScheduler
    raise AttributeError(f"module 'scheduler' has no attribute {name!r}")
