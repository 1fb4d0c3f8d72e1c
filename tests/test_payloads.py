"""The payload store: framing, compression, integrity, size limits (real Redis)."""

from __future__ import annotations

import os

import pytest

from app.core import payloads
from app.core.errors import PayloadError, PayloadTooLarge


def test_small_and_large_payloads_round_trip_and_large_ones_are_gzipped():
    small = {"command": "python train.py"}
    large = {"data": "x" * 100_000}
    assert payloads.unpack(payloads.pack(small, 2**20)) == small
    packed = payloads.pack(large, 2**20)
    assert payloads.unpack(packed) == large
    assert len(packed) < 2_000, "repetitive data above 4 KiB is compressed"


@pytest.mark.parametrize(("damage", "message"), [
    (lambda b: b[:10], "truncated"),
    (lambda b: b[:-1], "corrupted"),
    (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], "corrupted"),
    (lambda b: b"GPQ0" + b[4:], "not a gpuq payload of this version"),
])
def test_damaged_payloads_are_refused_before_unpickling(damage, message):
    data = payloads.pack({"fn": "anything", "pad": "y" * 100}, 2**20)
    with pytest.raises(PayloadError, match=message):
        payloads.unpack(damage(data))


def test_oversize_payload_is_refused_and_not_stored(rt):
    with pytest.raises(PayloadTooLarge, match="over the limit of 1,000"):
        payloads.store(rt.redis, os.urandom(5_000), 60, 1_000)
    assert rt.redis.keys("gpuq:payload:*") == []


def test_a_missing_payload_names_what_happened(rt):
    with pytest.raises(PayloadError, match="gone"):
        payloads.load(rt.redis, "gpuq:payload:launch:deadbeef")


def test_stored_payload_has_the_ttl_asked_for(rt):
    key = payloads.store(rt.redis, b"x", 3600, 2**20)
    assert 3590 < rt.redis.ttl(key) <= 3600
