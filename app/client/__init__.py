"""What a submitting user imports: the client and its job handles, and what code inside a
job imports: its JobEnvironment.

The names load on first use, so that `from app.client import JobEnvironment` inside a job
costs the standard library only, not the client's Celery and database imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.client.client import Client, JobHandle, LaunchHandle
    from app.client.environment import JobEnvironment

__all__ = ["Client", "JobEnvironment", "JobHandle", "LaunchHandle"]

_MODULES = {"Client": "app.client.client", "JobHandle": "app.client.client",
            "LaunchHandle": "app.client.client", "JobEnvironment": "app.client.environment"}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
