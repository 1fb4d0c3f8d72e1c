"""The payload store: framing, compression, integrity, size limits; the database's durable
copy and Redis's cache of it (real Redis, real database)."""

from __future__ import annotations

import os

import pytest
from sqlmodel import select

from app.core import payloads
from app.core.errors import PayloadError, PayloadTooLarge
from app.store import payload_store
from app.store.models import Payload

KEY = "gpuq:payload:launch:0123456789abcdef"


def test_small_and_large_payloads_round_trip_and_large_ones_are_gzipped():
    small = {"command": "python train.py"}
    large = {"data": "x" * 100_000}
    assert payloads.unpack(payloads.pack(small, 2**20, key=KEY), key=KEY) == small
    packed = payloads.pack(large, 2**20, key=KEY)
    assert payloads.unpack(packed, key=KEY) == large
    assert len(packed) < 2_000, "repetitive data above 4 KiB is compressed"


@pytest.mark.parametrize(("damage", "message"), [
    (lambda b: b[:10], "truncated"),
    (lambda b: b[:-1], "corrupted"),
    (lambda b: b[:50] + bytes([b[50] ^ 1]) + b[51:], "corrupted"),
    (lambda b: b"GPQ0" + b[4:], "not a gpuq payload of this version"),
])
def test_damaged_payloads_are_refused_before_unpickling(damage, message):
    data = payloads.pack({"fn": "anything", "pad": "y" * 100}, 2**20, key=KEY)
    with pytest.raises(PayloadError, match=message):
        payloads.unpack(damage(data), key=KEY)


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


def _adopted(rt, value, ttl_s=3600):  # type: ignore[no-untyped-def]
    key = payloads.store(rt.redis, value, ttl_s, 2**20)
    with rt.session() as session:
        payload_store.adopt(session, rt.redis, key, 2**20)
    return key


def test_a_payload_redis_lost_is_read_from_the_database_and_cached_again(rt):
    key = _adopted(rt, {"command": "train", "secrets": {"T": "x"}})
    rt.redis.delete(key)
    value = payload_store.load(rt.redis, rt.engine, key, cache_ttl_s=600, secret=None,
                               limit_bytes=2**20)
    assert value == {"command": "train", "secrets": {"T": "x"}}
    assert 590 < rt.redis.ttl(key) <= 600, "cached again, for the cache's time"
    assert payloads.load(rt.redis, key) == value


def test_a_payload_in_neither_place_names_what_happened(rt):
    key = _adopted(rt, "x")
    with rt.session() as session:
        payload_store.drop(session, rt.redis, key)
    assert not rt.redis.exists(key)
    with pytest.raises(PayloadError, match="neither Redis nor the database"):
        payload_store.fetch(rt.redis, rt.engine, key, 600)


def test_adopting_refuses_a_missing_a_foreign_or_an_adopted_key(rt):
    key = _adopted(rt, "x")
    with rt.session() as session, pytest.raises(PayloadError, match="another launch"):
        payload_store.adopt(session, rt.redis, key, 2**20)
    with rt.session() as session, pytest.raises(PayloadError, match="not in Redis"):
        payload_store.adopt(session, rt.redis, "gpuq:payload:launch:" + "0" * 16, 2**20)
    rt.redis.set("gpuq:hosts", b"not a payload")
    with rt.session() as session, pytest.raises(PayloadError, match="not a payload key"):
        payload_store.adopt(session, rt.redis, "gpuq:hosts", 2**20)
    big = payloads.store(rt.redis, os.urandom(5_000), 3600, 2**20)
    with rt.session() as session, pytest.raises(PayloadTooLarge, match="GPUQ_MAX_PAYLOAD"):
        payload_store.adopt(session, rt.redis, big, 1_000)
    with rt.session() as session:
        assert list(session.exec(select(Payload.key))) == [key]
