"""The list of backends: names and where their adapters live, imported on first use.

`local` is gpuq's own GPU workers; every other name is a batch adapter under `adapters/`.
Only names live here, so that a job spec can be checked without importing any backend's SDK.
"""

from __future__ import annotations

import importlib
from typing import Any

LOCAL = "local"
ADAPTERS: dict[str, str] = {
    "process": "adapters.process:ProcessAdapter",
    "slurm": "adapters.slurm:SlurmAdapter",
    "aws_batch": "adapters.aws_batch:AwsBatchAdapter",
    "kubernetes": "adapters.kubernetes:KubernetesAdapter",
}
BACKENDS: tuple[str, ...] = (LOCAL, *ADAPTERS)


def adapter_class(backend: str) -> Any:
    """The adapter class (an adapters.base.BatchAdapter) of a batch backend, importing its
    module now. Typed loosely: the vocabulary floor names no class of the adapters'."""
    module, _, name = ADAPTERS[backend].partition(":")
    return getattr(importlib.import_module(module), name)


def adapter_classes() -> dict[str, Any]:
    """Every batch backend's adapter class, by name."""
    return {backend: adapter_class(backend) for backend in ADAPTERS}
