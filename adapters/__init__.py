"""Batch backends behind one submit / poll / cancel contract, and the universal runner."""

from adapters.base import BatchAdapter, Status, Submission
from adapters.process import ProcessAdapter

ADAPTERS: dict[str, type[BatchAdapter]] = {ProcessAdapter.backend_name: ProcessAdapter}

__all__ = ["ADAPTERS", "BatchAdapter", "ProcessAdapter", "Status", "Submission"]
