"""Who may talk to gpuq: the start-up refusal (Redis beyond loopback) or warning (on
loopback) without a shared secret, loopback checks, and TLS options for `rediss://` broker
URLs."""

from __future__ import annotations

import ipaddress
import logging
import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

from app.core.errors import NoRunAccount, SecretRequired
from app.core.settings import Settings

log = logging.getLogger("gpuq.security")

NO_SECRET_WARNING = (
    "GPUQ_SECRET is not set: payloads in Redis are not authenticated, so anyone who can write "
    "to this Redis can run code on the workers. Set the same GPUQ_SECRET on every client and "
    "worker.")


def warn_without_secret(settings: Settings) -> bool:
    """Say once, as a worker starts, that without a secret Redis is the only door; True
    when it was said. Beyond loopback, refuse instead (`require_secret`)."""
    require_secret(settings)
    if settings.secret:
        return False
    log.warning(NO_SECRET_WARNING)
    return True


def redis_beyond_loopback(url: str | None) -> bool:
    """Whether a Redis URL may be reached from other hosts: any host but a loopback address,
    and every sentinel:// URL (its master is found at run time). Unset means the embedded
    server, which never listens beyond loopback without a secret."""
    if not url:
        return False
    parts = urlsplit(url)
    if parts.scheme in ("unix", "redis+socket"):
        return False
    if parts.scheme not in ("redis", "rediss"):
        return True
    return not is_loopback(parts.hostname or "")


def require_secret(settings: Settings) -> None:
    """Refuse to start a worker without GPUQ_SECRET where Redis is reachable beyond this
    host: whoever reaches that Redis could have the workers run anything."""
    if settings.secret or not redis_beyond_loopback(settings.redis_url):
        return
    parts = urlsplit(settings.redis_url or "")
    where = (f"Redis (found through Sentinel at {parts.hostname}) may be" if
             parts.scheme == "sentinel" else f"Redis ({parts.hostname or parts.netloc}) is")
    raise SecretRequired(
        f"GPUQ_SECRET is not set and {where} reachable beyond this host, so anyone who can "
        "write to it could run code on the workers; set the same GPUQ_SECRET on every "
        "client and worker (or use a Redis on 127.0.0.1)")


def open_to_local_accounts(settings: Settings) -> str | None:
    """Why any account on this host could drive the stack through Redis (no GPUQ_SECRET,
    and a Redis URL that asks no password), or None where it cannot. The embedded server
    (no URL) always asks the password it keeps in GPUQ_HOME."""
    if settings.secret or not settings.redis_url:
        return None
    parts = urlsplit(settings.redis_url)
    if parts.password or parse_qs(parts.query).get("password"):
        return None
    return (f"GPUQ_SECRET is not set and this stack's Redis ({parts.hostname or parts.path}) "
            "asks no password, so a job of any account could send the stack's messages")


def check_closed_to_jobs(settings: Settings, owner: str, account: str) -> None:
    """Raise NoRunAccount where `owner`'s job, run as the OS `account`, could drive the
    stack through an open Redis: such a job must not run."""
    if why := open_to_local_accounts(settings):
        raise NoRunAccount(f"{owner}'s jobs run as {account}, but {why}: set GPUQ_SECRET (or "
                           "a Redis password) on every host")


def reachable_host(bind: str) -> str:
    """How this host reaches a server bound to `bind`, as a URL's host: loopback for a
    wildcard address, an IPv6 address in brackets."""
    if bind in ("0.0.0.0", "::", "*", ""):
        return "127.0.0.1"
    return f"[{bind}]" if ":" in bind else bind


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`; False for every other address or name."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL,
              "none": ssl.CERT_NONE, "cert_required": ssl.CERT_REQUIRED,
              "cert_optional": ssl.CERT_OPTIONAL, "cert_none": ssl.CERT_NONE}
_SSL_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def redis_ssl_options(url: str) -> dict[str, Any] | None:
    """Celery's `broker_use_ssl` / `redis_backend_use_ssl` for a `rediss://` URL (None for
    plain `redis://`): certificates are verified unless the URL's `ssl_cert_reqs` says
    otherwise; `ssl_ca_certs`, `ssl_certfile` and `ssl_keyfile` are taken from it too."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    wanted = query.get("ssl_cert_reqs", "required").lower()
    if wanted not in _CERT_REQS:
        from app.core.errors import GpuqError

        raise GpuqError(f"ssl_cert_reqs={wanted!r} in GPUQ_REDIS_URL; use required, optional "
                        "or none")
    options: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[wanted]}
    options.update({name: query[name] for name in _SSL_FILES if name in query})
    return options
