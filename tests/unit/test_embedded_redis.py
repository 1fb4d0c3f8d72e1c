"""The embedded server: started once per GPUQ_HOME, found and reused, persistent, local."""

from __future__ import annotations

import pytest
import redis

from app.core.errors import BrokerUnavailable
from app.core.settings import Settings
from app.store.embedded_redis import EmbeddedRedis, find_embedded, resolve_redis_url


def test_embedded_server_is_reused_configured_and_stopped(tmp_path):
    settings = Settings(home=tmp_path, redis_url=None, _env_file=None)
    owner = EmbeddedRedis(settings)
    url = owner.start()
    try:
        assert url.startswith("redis://:") and "@127.0.0.1:" in url, "loopback, with a password"
        assert find_embedded(settings) == url
        assert resolve_redis_url(settings) == url
        second = EmbeddedRedis(settings)
        assert second.start() == url and not second.owned, "a second start reuses the server"
        client = redis.Redis.from_url(url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("bind")["bind"].startswith("127.0.0.1")
        client.set("kept", "1")
        client.close()
    finally:
        owner.stop()
    assert find_embedded(settings) is None
    restarted = EmbeddedRedis(settings)
    assert restarted.start() == url, "a restart comes back on the same port"
    try:
        client = redis.Redis.from_url(url)
        assert client.get("kept") == b"1", "AOF kept the data across the restart"
        client.close()
    finally:
        restarted.stop()


def test_no_server_and_no_url_names_the_fix(tmp_path):
    settings = Settings(home=tmp_path, redis_url=None, _env_file=None)
    with pytest.raises(BrokerUnavailable, match=r"gpuq up.*GPUQ_REDIS_URL"):
        resolve_redis_url(settings)
