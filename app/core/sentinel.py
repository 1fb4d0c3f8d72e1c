"""Redis behind Sentinel: the `sentinel://` form of GPUQ_REDIS_URL, read once here.

    sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...][/DB]?master=NAME[&sentinel_password=P]

names the sentinels (not the Redis primary), the monitored master's name, and the database
number; PASSWORD is the Redis servers' password, `sentinel_password` the sentinels' own
(when they ask for one). gpuq asks the sentinels for the current primary on every new
connection, so that after a failover its clients, workers and Celery follow the promoted
replica. Celery's broker and result backend get kombu's own form of the same URL
(`sentinel://h1:p1/DB;sentinel://h2:p2/DB` with the master in the transport options).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

if TYPE_CHECKING:
    import redis

SCHEME = "sentinel"
USAGE = ("sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...][/DB]?master=NAME"
         "[&sentinel_password=P]")


@dataclass(frozen=True)
class SentinelUrl:
    """The parts of a `sentinel://` URL."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelUrl | None:
        """The parts of a `sentinel://` URL; None for any other scheme; ValueError, naming
        the expected form, for a malformed one."""
        parts = urlsplit(url)
        if parts.scheme != SCHEME:
            return None
        userinfo, _, hosts = parts.netloc.rpartition("@")
        username, _, password = userinfo.partition(":")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        master = query.get("master", "")
        if not master:
            raise ValueError(f"a sentinel:// Redis URL names its master: {USAGE}")
        db_text = parts.path.strip("/") or "0"
        if not db_text.isdigit():
            raise ValueError(f"database {db_text!r} in a sentinel:// URL is a number: {USAGE}")
        return cls(sentinels=tuple(_host_port(h) for h in hosts.split(",")), master=master,
                   db=int(db_text), username=unquote(username) or None,
                   password=unquote(password) or None,
                   sentinel_password=query.get("sentinel_password") or None)

    def _auth(self) -> str:
        if self.password is None:
            return ""
        return f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"

    def kombu_url(self) -> str:
        """The broker and result-backend URL that kombu and Celery read."""
        return ";".join(f"sentinel://{self._auth()}{_netloc(host, port)}/{self.db}"
                        for host, port in self.sentinels)

    def transport_options(self) -> dict[str, Any]:
        """Celery's `broker_transport_options` / `result_backend_transport_options`."""
        options: dict[str, Any] = {"master_name": self.master}
        if self.sentinel_password:
            options["sentinel_kwargs"] = {"password": self.sentinel_password}
        return options

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client of the current primary, found anew through the sentinels after a
        failover; `kwargs` as for redis.Redis (timeouts, health checks)."""
        from redis.sentinel import Sentinel

        timeouts = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
        sentinel_kwargs = {**timeouts, **({"password": self.sentinel_password}
                                          if self.sentinel_password else {})}
        sentinel = Sentinel(list(self.sentinels), sentinel_kwargs=sentinel_kwargs)
        return sentinel.master_for(self.master, db=self.db, username=self.username,
                                   password=self.password, **kwargs)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"sentinel {text!r} is not HOST:PORT: {USAGE}")
    return host.strip("[]"), int(port)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
