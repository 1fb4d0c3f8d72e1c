"""Histograms kept in Redis, so that what one process observes (a dispatch pass in a GPU
worker or in beat, a job's wait in the queue where it is dispatched) is read by another
(the dashboard's /metrics).

Each histogram is one hash (keys.histogram): a count per bucket (not cumulative; "+Inf"
for values above the last bound), the sum and the count. One observation adds to all three
in one MULTI/EXEC, so a reader never sees a count without its bucket. Like every Redis key
it can be lost: Prometheus reads a histogram that starts again from zero as a counter reset.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from app.core import keys

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

DISPATCH_PASS = "dispatch_pass_seconds"  # one pass of the dispatcher, start to end
QUEUE_WAIT = "queue_wait_seconds"  # a job's submission to its dispatch

# Each histogram's upper bucket bounds in seconds, ascending; fixed, since a bucket's
# count is kept under its bound's name.
BOUNDS: dict[str, tuple[float, ...]] = {
    DISPATCH_PASS: (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0),
    QUEUE_WAIT: (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0,
                 6 * 3600.0, 12 * 3600.0, 86400.0, 2 * 86400.0, 7 * 86400.0),
}
INF = "+Inf"
SUM = "sum"
COUNT = "count"


def bucket_name(bound: float) -> str:
    """A bound as Prometheus writes an `le` label (0.005, 1.0, +Inf)."""
    return INF if math.isinf(bound) else repr(float(bound))


def bucket_of(name: str, seconds: float) -> str:
    """The bucket an observation falls in: the first bound at or above it."""
    for bound in BOUNDS[name]:
        if seconds <= bound:
            return bucket_name(bound)
    return INF


def observe(r: redis.Redis, name: str, seconds: float) -> None:
    """Add one observation of `seconds` (a negative one, from clocks apart, counts as 0) to
    the histogram `name`. Redis failing loses the observation with a warning: measuring
    never breaks what it measures."""
    import redis as redis_errors

    if not math.isfinite(seconds):
        log.warning("histogram %s: not a duration, not observed: %r", name, seconds)
        return
    seconds = max(0.0, float(seconds))
    key = keys.histogram(name)
    try:
        pipe = r.pipeline(transaction=True)
        pipe.hincrby(key, bucket_of(name, seconds), 1)
        pipe.hincrbyfloat(key, SUM, seconds)
        pipe.hincrby(key, COUNT, 1)
        pipe.execute()
    except (redis_errors.RedisError, OSError) as e:
        log.warning("histogram %s: observation of %.6g s lost: %s", name, seconds, e)


def read(r: redis.Redis, name: str) -> tuple[list[tuple[str, float]], float, int]:
    """(buckets, sum, count): the buckets cumulative, as (upper bound, observations at or
    below it), "+Inf" last, as prometheus_client's HistogramMetricFamily takes them."""
    raw: dict[bytes, bytes] = r.hgetall(keys.histogram(name))  # type: ignore[assignment]
    stored = {k.decode(): v.decode() for k, v in raw.items()}
    buckets: list[tuple[str, float]] = []
    total = 0
    for bucket in [*(bucket_name(b) for b in BOUNDS[name]), INF]:
        total += int(stored.get(bucket, 0))
        buckets.append((bucket, total))
    return buckets, float(stored.get(SUM, 0.0)), int(stored.get(COUNT, 0))
