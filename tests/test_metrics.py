"""The Redis histograms (app/store/histograms.py): cumulative buckets, sum and count, and an
observation that cannot be written never raises."""

from __future__ import annotations

import logging

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.store import histograms


def test_histograms_keep_cumulative_buckets_sum_and_count(rt):
    r = rt.redis
    for seconds in (0.5, 1.0, 3.0, 3.0, 90.0, 10 * 86400.0, -2.0):
        histograms.observe(r, histograms.QUEUE_WAIT, seconds)
    buckets, total, count = histograms.read(r, histograms.QUEUE_WAIT)
    assert [le for le, _ in buckets] == [
        *(repr(b) for b in histograms.BOUNDS[histograms.QUEUE_WAIT]), "+Inf"]
    cumulative = dict(buckets)
    assert (cumulative["1.0"], cumulative["5.0"], cumulative["60.0"]) == (3, 5, 5)
    assert (cumulative["300.0"], cumulative["604800.0"], cumulative["+Inf"]) == (6, 6, 7)
    assert [n for _, n in buckets] == sorted(n for _, n in buckets)
    assert count == 7 and total == pytest.approx(0.5 + 1 + 3 + 3 + 90 + 10 * 86400)
    assert histograms.read(r, histograms.DISPATCH_PASS) == (
        [(repr(b), 0) for b in histograms.BOUNDS[histograms.DISPATCH_PASS]] + [("+Inf", 0)],
        0.0, 0)


def test_a_histogram_that_cannot_be_written_warns_and_never_raises(caplog):
    away = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5,
                       retry=Retry(NoBackoff(), 0))
    with caplog.at_level(logging.WARNING, logger="app.store.histograms"):
        histograms.observe(away, histograms.DISPATCH_PASS, 0.01)
    assert "observation of 0.01 s lost" in caplog.text
    away.close()
