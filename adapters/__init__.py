"""Batch backends behind one submit / poll / cancel contract, and the universal runner."""

from adapters.aws_batch import AwsBatchAdapter
from adapters.base import BatchAdapter, Status, Submission
from adapters.kubernetes import KubernetesAdapter
from adapters.process import ProcessAdapter
from adapters.slurm import SlurmAdapter

ADAPTERS: dict[str, type[BatchAdapter]] = {
    adapter.backend_name: adapter
    for adapter in (ProcessAdapter, SlurmAdapter, AwsBatchAdapter, KubernetesAdapter)
}

__all__ = ["ADAPTERS", "AwsBatchAdapter", "BatchAdapter", "KubernetesAdapter",
           "ProcessAdapter", "SlurmAdapter", "Status", "Submission"]
