"""The http transport: a named user runs operations through a gpuq dashboard (GPUQ_URL),
showing their token (GPUQ_TOKEN, or a file only they may read: GPUQ_TOKEN_FILE)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from app.core.errors import (
    BrokerUnavailable,
    GpuqError,
    InvalidToken,
    OperationTimeout,
    error_from_envelope,
)
from app.core.settings import Settings


def token_of(settings: Settings) -> str | None:
    """The named user's token: GPUQ_TOKEN, else the token file; None when neither is there.
    A token file that group or others may open is refused: anyone who reads it is them."""
    if settings.token:
        return settings.token.strip()
    path = settings.token_file.expanduser()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    if stat.S_IMODE(mode) & 0o077:
        raise InvalidToken(f"the token file {path} is open to other users (mode "
                           f"{stat.S_IMODE(mode):04o}); make it yours alone: chmod 600 {path}")
    return Path(path).read_text().strip() or None


def default_transport(settings: Settings) -> str:
    """http where a dashboard address and a token are given, else GPUQ_TRANSPORT."""
    if settings.url and settings.transport == "local" and token_of(settings):
        return "http"
    return settings.transport


def call_http(settings: Settings, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """POST the operation's arguments to the dashboard's /api/ops/NAME; its refusals come
    back as gpuq's own errors."""
    import urllib.error
    import urllib.parse
    import urllib.request

    if not settings.url:
        raise GpuqError("the http transport needs the dashboard's address: set GPUQ_URL "
                        "(http://host:port)")
    token = token_of(settings)
    if token is None:
        raise InvalidToken(f"no token: set GPUQ_TOKEN, or put it in {settings.token_file} "
                           "(chmod 600); `gpuq user add NAME` on the stack issues one")
    base = settings.url.rstrip("/")
    request = urllib.request.Request(
        f"{base}/api/ops/{urllib.parse.quote(name, safe='')}", method="POST",
        data=json.dumps(kwargs).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=settings.op_timeout_s) as answer:
            value: dict[str, Any] = json.loads(answer.read())
            return value
    except urllib.error.HTTPError as e:
        raise _refusal(base, e.code, e.read()) from None
    except TimeoutError:
        raise OperationTimeout(f"gpuq at {base} did not answer {name!r} within "
                               f"{settings.op_timeout_s}s") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise BrokerUnavailable(f"cannot reach gpuq at {base}: {reason}; check GPUQ_URL and "
                                "that its dashboard runs") from None


def _refusal(base: str, status: int, body: bytes) -> GpuqError:
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    message = answer.get("message") if isinstance(answer, dict) else None
    if status == 401:
        return InvalidToken(f"gpuq at {base} refused the token (GPUQ_TOKEN or "
                            "GPUQ_TOKEN_FILE): unknown or revoked; ask the stack's owner for "
                            "one (`gpuq user add NAME`)")
    if isinstance(answer, dict) and isinstance(answer.get("code"), str) and message:
        return error_from_envelope(answer["code"], str(message))
    return GpuqError(f"gpuq at {base} answered HTTP {status}: {body[:200]!r}")
