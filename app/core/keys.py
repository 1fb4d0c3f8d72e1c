"""Every Redis key and Celery queue name gpuq uses, in one place.

Redis holds caches and hints (the database is the truth): a key here can be lost and is
rebuilt or waited out; see docs/architecture.md for who writes each.
"""

from __future__ import annotations

import secrets

PREFIX = "gpuq"

# -- Celery queues ----------------------------------------------------------------------
CONTROL_QUEUE = "control"  # operations, dispatch, reconcile, batch syncs
CPU_QUEUE = "cpu"  # 0-GPU jobs, on every host's thread-pool worker


def gpu_queue(host: str, index: int) -> str:
    """The queue of one GPU: routing a job here is its allocation."""
    return f"gpu.{host}.{index}"


# -- dispatch ---------------------------------------------------------------------------
DISPATCH_LOCK = f"{PREFIX}:dispatch:lock"
DISPATCH_DIRTY = f"{PREFIX}:dispatch:dirty"  # a pass was asked for while one ran
# The reservations with a known start (JSON, scheduler/planner/reservations.py), written by
# the pass that holds the dispatcher's turn and kept by every next pass.
RESERVATIONS = f"{PREFIX}:dispatch:reservations"

# -- metrics (owned by app/store/histograms.py) -----------------------------------------


def histogram(name: str) -> str:
    """Hash: one histogram's count per bucket, its sum and its count, added to by whichever
    process observes it and read by the dashboard's /metrics."""
    return f"{PREFIX}:histogram:{name}"


# -- the cluster's live state (owned by app/store/cluster.py) ---------------------------
HOSTS = f"{PREFIX}:hosts"  # set of host names that registered GPUs
# When the reconciler last looked for jobs stranded by their dependencies' endings.
RECONCILED_ENDINGS = f"{PREFIX}:reconciled-endings"
# Since when the inventory is whole: 0 once a host's `gpuq worker` wrote it, the time of the
# first repair when GPU workers had to put their GPUs back after Redis lost them.
INVENTORY_SINCE = f"{PREFIX}:hosts:since"


def host_gpus(host: str) -> str:
    """Hash: GPU index -> JSON description, written by `gpuq worker`."""
    return f"{PREFIX}:gpus:{host}"


def cpu_slots(host: str) -> str:
    """A host's CPU worker is alive with this many slots for 0-GPU jobs (TTL'd)."""
    return f"{PREFIX}:cpu:{host}"


def alive(host: str, index: int) -> str:
    """Heartbeat of the worker of one GPU; expires when the worker stops refreshing it."""
    return f"{PREFIX}:alive:{host}:{index}"


def hold(host: str, index: int) -> str:
    """Reservation of one GPU: the id of the job holding it, with a TTL."""
    return f"{PREFIX}:hold:{host}:{index}"


def reading(host: str, index: int) -> str:
    """Latest monitor reading of one GPU (JSON), published by its worker."""
    return f"{PREFIX}:reading:{host}:{index}"


RESTARTS = f"{PREFIX}:restarts"  # sorted set: "host/program" -> time of its latest exit


def restarts(host: str, program: str) -> str:
    """Hash: exits of one supervised program on one host (code, backoff, recent times)."""
    return f"{PREFIX}:restarts:{host}/{program}"


# -- jobs -------------------------------------------------------------------------------


def cancel(job_id: int) -> str:
    """Set when a running job must be stopped; its worker polls it."""
    return f"{PREFIX}:cancel:{job_id}"


def outcome(job_id: int, attempt: int) -> str:
    """How an attempt ended, kept by its worker until the database has it: a reconciler
    that finds the attempt's lease ran out records this instead of calling it lost."""
    return f"{PREFIX}:outcome:{job_id}.{attempt}"


def new_payload(kind: str = "launch") -> str:
    """A fresh key for one stored payload (claim check), unguessable."""
    return f"{PREFIX}:payload:{kind}:{secrets.token_hex(8)}"


def op_nonce(nonce: str) -> str:
    """Set (NX, with a TTL) by the control worker that accepts a signed operation: a copy of
    the message is refused while it lives (app/core/signing.py)."""
    return f"{PREFIX}:nonce:{nonce}"


def result(job_id: int) -> str:
    """The framed result (or error envelope) of a Python-function job."""
    return f"{PREFIX}:result:{job_id}"


# -- batch backends ---------------------------------------------------------------------
BATCH_MISSING = f"{PREFIX}:batch:missing"  # hash: backend id -> when first not found


def batch_poll(backend: str) -> str:
    """Hash: when a backend's next backed-off sync is due, and its current interval."""
    return f"{PREFIX}:batch:{backend}:poll"


def batch_cancelled(backend: str, backend_id: str) -> str:
    """Set when gpuq cancelled a backend job, so that its end reads CANCELLED."""
    return f"{PREFIX}:batch:{backend}:cancelled:{backend_id}"


def batch_sync_lock(backend: str) -> str:
    """Lock: the one sync of a backend running now (expires if its holder dies)."""
    return f"{PREFIX}:batch:{backend}:sync-lock"


def batch_sync_again(backend: str) -> str:
    """Set when a sync was asked for while another ran: the running one passes again."""
    return f"{PREFIX}:batch:{backend}:sync-again"
