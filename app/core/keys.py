"""Redis key names shared by the client, the dispatcher and the workers."""

from __future__ import annotations

PREFIX = "gpuq"
HOSTS = f"{PREFIX}:hosts"  # set of host names that registered GPUs
DISPATCH_LOCK = f"{PREFIX}:dispatch:lock"
DISPATCH_DIRTY = f"{PREFIX}:dispatch:dirty"


def host_gpus(host: str) -> str:
    """Hash: GPU index -> JSON description, written by `gpuq worker`."""
    return f"{PREFIX}:gpus:{host}"


def alive(host: str, index: int) -> str:
    """Heartbeat of the worker of one GPU; expires when the worker stops refreshing it."""
    return f"{PREFIX}:alive:{host}:{index}"


def hold(host: str, index: int) -> str:
    """Reservation of one GPU: the id of the job holding it, with a TTL."""
    return f"{PREFIX}:hold:{host}:{index}"


def cancel(job_id: int) -> str:
    """Set when a running job must be stopped; its worker polls it."""
    return f"{PREFIX}:cancel:{job_id}"


def reading(host: str, index: int) -> str:
    """Latest monitor reading of one GPU (JSON), published by its worker."""
    return f"{PREFIX}:reading:{host}:{index}"


RESTARTS = f"{PREFIX}:restarts"  # sorted set: "host/program" -> time of its latest exit


def restarts(host: str, program: str) -> str:
    """Hash: exits of one supervised program on one host (code, backoff, recent times)."""
    return f"{PREFIX}:restarts:{host}/{program}"
