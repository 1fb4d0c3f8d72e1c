"""Fit: which GPUs of which host a job may take now, and whether any host could ever hold it."""

from __future__ import annotations

from collections.abc import Callable

from app.store.cluster import HostView
from scheduler.planner.candidates import Candidate

# Whether a GPU (host, index) is closed to the job being placed (set aside for another).
Closed = Callable[[str, int], bool]

CAPPED_REASON = "over a limit: its user's or project's GPU limit was reached meanwhile"
WAITING_REASON = ("waiting: no host has {gpus} GPUs in service now (used by processes "
                  "outside gpuq, or their workers are down)")


def no_resource_reason(gpus: int, largest: int) -> str:
    return f"asks for {gpus} GPUs; the largest registered host has {largest}"


def allowed(job: Candidate, ids: list[int]) -> list[int]:
    """The GPUs among `ids` the job may use (its --gpu-ids)."""
    return [i for i in ids if job.allowed_gpu_ids is None or i in job.allowed_gpu_ids]


def pick(job: Candidate, hosts: list[HostView], closed: Closed
         ) -> tuple[HostView, list[int]] | None:
    """Best fit: the host with the fewest usable free GPUs that still holds the job."""
    options = []
    for host in hosts:
        usable = [i for i in allowed(job, host.free) if not closed(host.name, i)]
        if len(usable) >= job.gpus:
            options.append((len(usable), host.name, host, usable[: job.gpus]))
    if not options:
        return None
    _, _, host, gpus = min(options, key=lambda o: (o[0], o[1]))
    return host, gpus


def never_fits(job: Candidate, hosts: list[HostView]) -> str | None:
    """Why no registered host could ever hold the job, or None."""
    largest = max((h.capacity for h in hosts), default=0)
    if job.gpus > largest:
        return no_resource_reason(job.gpus, largest)
    if job.allowed_gpu_ids is not None and not any(
            len(allowed(job, h.indices)) >= job.gpus for h in hosts):
        ids = ",".join(map(str, job.allowed_gpu_ids))
        return (f"asks for {job.gpus} of GPUs {ids}; no registered host has "
                f"{job.gpus} of those indices")
    return None
