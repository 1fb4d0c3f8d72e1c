"""The http transport: operations POSTed to a gpuq dashboard's /api/ops/NAME.

Two users take it. A named user reaches a dashboard at GPUQ_URL, showing their token
(GPUQ_TOKEN, or a file only they may read: GPUQ_TOKEN_FILE). The stack's owner reaches
their own stack's dashboard over its unix socket in GPUQ_HOME (which only they may open),
showing the dashboard's token: the everyday commands answer so without loading the
database, Redis or pydantic. When that socket does not answer (the stack is down, or it is
another stack's), the owner's client runs the operation in process instead.

The standard library only: this module is what those commands load to reach gpuq.
"""

from __future__ import annotations

import http.client
import json
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core import envvars
from app.core.errors import (
    BrokerUnavailable,
    GpuqError,
    InvalidToken,
    OperationTimeout,
    error_from_envelope,
)

if TYPE_CHECKING:
    from app.core.settings import Settings


class StackUnreachable(Exception):
    """The owner's stack did not take the request (no socket, nobody listening, or another
    token): nothing was run, and the operation may run in process instead."""


@dataclass(frozen=True)
class Endpoint:
    """Where the http transport sends operations: a dashboard's address (`url`), or the
    unix socket of this home's stack (`socket`, for its owner)."""

    token: str
    timeout_s: float
    url: str | None = None
    socket: Path | None = None

    @property
    def where(self) -> str:
        return str(self.socket) if self.socket is not None else (self.url or "").rstrip("/")

    def call(self, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """POST the operation's arguments; its refusals come back as gpuq's own errors."""
        from urllib.parse import quote

        connection, prefix = self._connection()
        try:
            body = json.dumps(kwargs).encode()
            connection.request(
                "POST", f"{prefix}/api/ops/{quote(name, safe='')}", body=body,
                headers={"Authorization": f"Bearer {self.token}",
                         "Content-Type": "application/json"})
            answer = connection.getresponse()
            data = answer.read()
        except TimeoutError:
            raise OperationTimeout(f"gpuq at {self.where} did not answer {name!r} within "
                                   f"{self.timeout_s}s") from None
        except OSError as e:
            raise BrokerUnavailable(f"gpuq at {self.where} broke off {name!r}: {e}") from None
        finally:
            connection.close()
        if answer.status == 200:
            value: dict[str, Any] = json.loads(data)
            return value
        if answer.status == 401 and self.socket is not None:
            raise StackUnreachable(f"{self.socket} refused the dashboard's token")
        raise _refusal(self.where, answer.status, data)

    def _connection(self) -> tuple[http.client.HTTPConnection, str]:
        """A connected connection and the path prefix of the dashboard's routes."""
        from urllib.parse import urlsplit

        if self.socket is not None:
            connection: http.client.HTTPConnection = _UnixConnection(self.socket,
                                                                     self.timeout_s)
            prefix = ""
        else:
            parts = urlsplit(self.url or "")
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise GpuqError(f"GPUQ_URL {self.url!r} is no dashboard address; give "
                                "http://host:port")
            kind = (http.client.HTTPSConnection if parts.scheme == "https"
                    else http.client.HTTPConnection)
            connection = kind(parts.hostname, parts.port, timeout=self.timeout_s)
            prefix = parts.path.rstrip("/")
        try:
            connection.connect()
        except OSError as e:
            connection.close()
            if self.socket is not None:
                raise StackUnreachable(f"{self.socket}: {e}") from None
            raise BrokerUnavailable(f"cannot reach gpuq at {self.where}: {e}; check GPUQ_URL "
                                    "and that its dashboard runs") from None
        return connection, prefix


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket; the Host it names is loopback's."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def read_token(token: str | None, token_file: Path) -> str | None:
    """A named user's token: `token`, else the token file; None when neither is there. A
    token file that group or others may open is refused: anyone who reads it is them."""
    if token:
        return token.strip()
    path = token_file.expanduser()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    if stat.S_IMODE(mode) & 0o077:
        raise InvalidToken(f"the token file {path} is open to other users (mode "
                           f"{stat.S_IMODE(mode):04o}); make it yours alone: chmod 600 {path}")
    return Path(path).read_text().strip() or None


def token_of(settings: Settings) -> str | None:
    return read_token(settings.token, settings.token_file)


def default_transport(settings: Settings) -> str:
    """http where a dashboard address and a token are given, else GPUQ_TRANSPORT."""
    if settings.url and settings.transport == "local" and token_of(settings):
        return "http"
    return settings.transport


def endpoint_of(settings: Settings) -> Endpoint:
    """The named user's dashboard, from the settings."""
    if not settings.url:
        raise GpuqError("the http transport needs the dashboard's address: set GPUQ_URL "
                        "(http://host:port)")
    token = token_of(settings)
    if token is None:
        raise InvalidToken(f"no token: set GPUQ_TOKEN, or put it in {settings.token_file} "
                           "(chmod 600); `gpuq user add NAME` on the stack issues one")
    return Endpoint(token, settings.op_timeout_s, url=settings.url)


def endpoint_from_environment() -> Endpoint | None:
    """Where the CLI's everyday commands go, read from the environment alone (app/core/
    envvars.py): the dashboard at GPUQ_URL with a named user's token (as default_transport
    chooses it), else, while GPUQ_TRANSPORT is unset, the socket of this home's stack with
    the dashboard's token. None where Settings must decide: another transport, a value to
    refuse, or neither there."""
    transport, url = envvars.setting("transport"), envvars.setting("url")
    timeout_s = envvars.op_timeout_s()
    if timeout_s is None or transport not in (None, "local", "http"):
        return None
    if url:
        try:
            token = read_token(envvars.setting("token"), Path(
                envvars.setting("token_file") or envvars.DEFAULT_TOKEN_FILE))
        except (InvalidToken, OSError):
            return None
        return Endpoint(token, timeout_s, url=url) if token else None
    if transport is not None:
        return None
    home = envvars.home()
    try:
        token = (envvars.setting("dashboard_token")
                 or (home / envvars.DASHBOARD_TOKEN_FILE).read_text().strip())
    except OSError:
        return None
    path = home / envvars.DASHBOARD_SOCKET
    return Endpoint(token, timeout_s, socket=path) if token and path.exists() else None


def _refusal(where: str, status: int, body: bytes) -> GpuqError:
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    message = answer.get("message") if isinstance(answer, dict) else None
    if status == 401:
        return InvalidToken(f"gpuq at {where} refused the token (GPUQ_TOKEN or "
                            "GPUQ_TOKEN_FILE): unknown or revoked; ask the stack's owner for "
                            "one (`gpuq user add NAME`)")
    if isinstance(answer, dict) and isinstance(answer.get("code"), str) and message:
        return error_from_envelope(answer["code"], str(message))
    return GpuqError(f"gpuq at {where} answered HTTP {status}: {body[:200]!r}")
