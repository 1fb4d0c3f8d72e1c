"""What the dashboard shows but the operations do not decide: masking, bars, staleness."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from app.core.settings import SECRET_MASK, mask_url
from app.core.states import JobState

# Variable names whose values are secrets by convention.
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSW|PWD|CREDENTIAL|AUTH|COOKIE|PRIVATE|(^|_)KEY($|_)",
                         re.IGNORECASE)
FAILURE_STATES = (JobState.FAILED, JobState.FAILED_PRECHECK, JobState.FAILED_NO_RESOURCE,
                  JobState.LOST, JobState.TIMEOUT)
# Order of the segments of a launch's progress bar.
BAR_ORDER = ("SUCCEEDED", "FAILED", "FAILED_PRECHECK", "FAILED_NO_RESOURCE", "LOST", "TIMEOUT",
             "CANCELLED", "CANCELLING", "RUNNING", "STARTING", "RECOVERING", "PENDING",
             "UNKNOWN")


def mask_env(env: dict[str, str]) -> dict[str, str]:
    """A job's environment with secret-looking values and URL passwords hidden."""
    return {key: SECRET_MASK if SECRET_NAME.search(key) else mask_url(value)
            for key, value in env.items()}


def bar_segments(counts: dict[str, int], total: int) -> list[dict[str, Any]]:
    """Segments of a progress bar: state, count and width in percent, in BAR_ORDER."""
    total = max(total, sum(counts.values()), 1)
    ordered = [s for s in BAR_ORDER if counts.get(s)] + sorted(
        s for s in counts if s not in BAR_ORDER and counts[s])
    return [{"state": s, "count": counts[s], "pct": round(100 * counts[s] / total, 3)}
            for s in ordered]


def reading_age_s(gpu: dict[str, Any], now: float) -> float | None:
    reading = gpu.get("reading") or {}
    at = reading.get("at")
    return None if at is None else max(0.0, now - float(at))


def is_stale(gpu: dict[str, Any], now: float, monitor_interval_s: float) -> bool:
    """A GPU whose worker stopped its heartbeat, or whose last reading is long past."""
    age = reading_age_s(gpu, now)
    return not gpu["alive"] or (age is not None and age > 3 * monitor_interval_s + 5)


def memory_pct(reading: dict[str, Any] | None) -> float:
    if not reading or not reading.get("memory_total_mb"):
        return 0.0
    return round(100 * reading["memory_used_mb"] / reading["memory_total_mb"], 1)


def clock(epoch: float) -> str:
    """`2025-01-31 12:00:00.125` (UTC) for an event's time."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
