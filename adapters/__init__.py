"""Batch backends behind one submit / poll / cancel contract, and the universal runner."""

from adapters.aws_batch import AwsBatchAdapter
from adapters.base import BatchAdapter, Status, Submission
from adapters.process import ProcessAdapter

ADAPTERS: dict[str, type[BatchAdapter]] = {
    adapter.backend_name: adapter for adapter in (ProcessAdapter, AwsBatchAdapter)
}

__all__ = ["ADAPTERS", "AwsBatchAdapter", "BatchAdapter", "ProcessAdapter", "Status",
           "Submission"]
