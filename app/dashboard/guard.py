"""What a browser may not do to the dashboard on a web page's behalf: reach it under a
host name it does not answer to (DNS rebinding), change state from another origin or with
a body a plain HTML form can send; and the headers that keep its pages out of frames and
its answers from being sniffed as something else."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from app.core.errors import GpuqError
from app.core.settings import Settings

Scope = dict[str, Any]
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})
WILDCARDS = frozenset({"0.0.0.0", "::", ""})
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# The pages load their own script and stylesheet and set bar widths in style attributes;
# /docs and /redoc (the API's reference) load their bundles from a CDN and run an inline
# script, so they get a policy of their own.
CSP = ("default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net "
            "https://fonts.googleapis.com; font-src 'self' https://fonts.gstatic.com; "
            "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; "
            "worker-src 'self' blob:; object-src 'none'; base-uri 'none'; "
            "frame-ancestors 'none'")
DOCS_PATHS = frozenset({"/docs", "/redoc", "/docs/oauth2-redirect"})
HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
           (b"x-frame-options", b"DENY")]


def split_host(value: str) -> tuple[str, int | None] | None:
    """`name[:port]` as (lowercase name, port or None); an IPv6 name keeps its brackets.
    None for what is no host name."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        name, rest = (value[:end + 1], value[end + 1:]) if end > 1 else ("", "")
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
        rest = ":" + port
    elif ":" in value:
        return None  # an IPv6 address without brackets
    else:
        name, rest = value, ""
    if not name:
        return None
    if not rest:
        return name, None
    if not rest.startswith(":") or not rest[1:].isdigit() or len(rest) > 6:
        return None
    return name, int(rest[1:])


@dataclass(frozen=True)
class AllowedHosts:
    """The host names the dashboard answers to: `names` on its own port, `any_port`
    on every port, and `exact` as given (name, port)."""

    names: frozenset[str]
    any_port: frozenset[str]
    exact: frozenset[tuple[str, int]]

    @classmethod
    def of(cls, settings: Settings) -> AllowedHosts:
        bind = settings.dashboard_address.strip().lower()
        names = set(LOOPBACK_NAMES)
        if bind in WILDCARDS:
            names |= {settings.hostname.lower(), socket.getfqdn().lower()}
        else:
            names.add(f"[{bind}]" if ":" in bind else bind)
        any_port: set[str] = set()
        exact: set[tuple[str, int]] = set()
        for entry in filter(None, (e.strip() for e in settings.dashboard_hosts.split(","))):
            parsed = split_host(entry)
            if parsed is None:
                raise GpuqError(f"GPUQ_DASHBOARD_HOSTS takes NAME or NAME:PORT, comma-"
                                f"separated; {entry!r} is neither")
            name, port = parsed
            if port is None:
                any_port.add(name)
            else:
                exact.add((name, port))
        return cls(frozenset(names), frozenset(any_port), frozenset(exact))

    def allow(self, value: str, scheme: str, own_port: int) -> bool:
        """True when `value` (a Host header, or an origin's host[:port]) names this
        dashboard."""
        parsed = split_host(value)
        if parsed is None:
            return False
        name, port = parsed
        port = DEFAULT_PORTS.get(scheme, 80) if port is None else port
        return (name in self.names and port == own_port) or name in self.any_port \
            or (name, port) in self.exact


class Guard:
    """ASGI middleware: Host, Origin, Sec-Fetch-Site and body type checks; security
    headers on every answer, refusals included."""

    def __init__(self, app: Any, hosts: AllowedHosts, port: int) -> None:
        self.app, self.hosts, self.port = app, hosts, port

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = (DOCS_CSP if scope["path"] in DOCS_PATHS else CSP).encode()

        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS,
                                      (b"content-security-policy", csp)]
            await send(message)

        refusal = self.refusal(scope)
        if refusal is None:
            await self.app(scope, receive, with_headers)
            return
        body = json.dumps({"code": "forbidden", "message": refusal}).encode()
        await with_headers({"type": "http.response.start", "status": 403, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def refusal(self, scope: Scope) -> str | None:
        """Why this request is refused, or None."""
        server = scope.get("server")
        if server and server[1] is None:
            # The stack's unix socket (app/dashboard/server.py): no web page reaches it, and
            # only the owner of GPUQ_HOME may connect to it.
            return None
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        scheme = scope.get("scheme", "http")
        own_port = int(server[1]) if server and server[1] else self.port
        host = headers.get("host", "")
        if not self.hosts.allow(host, scheme, own_port):
            return (f"this dashboard does not answer to the host name {host[:100]!r}; open it by "
                    "its bind address or 127.0.0.1, or add the name to GPUQ_DASHBOARD_HOSTS")
        if scope["method"] not in UNSAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is not None and not self._same_origin(origin, own_port):
            return (f"a change requested from another origin ({origin[:100]!r}) is refused; use "
                    "the dashboard's own pages or send no Origin header")
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return "a change requested from another site is refused"
        kind = headers.get("content-type", "").partition(";")[0].strip().lower()
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        if kind != "application/json" and (kind or has_body):
            return (f"a change must send its body as application/json, not "
                    f"{kind[:100] or 'none'!r}"
                    " (a form or text/plain body is what a web page can send from afar)")
        return None

    def _same_origin(self, origin: str, own_port: int) -> bool:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return False
        return self.hosts.allow(parts.netloc, parts.scheme, own_port)

