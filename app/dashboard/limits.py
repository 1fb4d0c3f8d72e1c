"""A bound on request bodies: a request over it is answered 413 naming the limit, before
its body is read into memory (by its Content-Length) or as soon as it passes the limit (a
body sent in chunks)."""

from __future__ import annotations

import json
from typing import Any

# The largest body the API takes: a job's command (120 KiB) and environment (64 KiB) with
# room to spare.
MAX_BODY_BYTES = 1024 * 1024

Scope = dict[str, Any]
Message = dict[str, Any]


class _TooLarge(BaseException):
    """Raised from `receive` past the limit: a BaseException, so that the framework's
    handlers of a body that does not parse (an HTTP 400) let it through to the bound."""


class BodyLimit:
    """ASGI middleware: at most `limit` bytes of request body."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send, int(declared))
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message: Message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except BaseException as e:
            too_large = isinstance(e, _TooLarge) or (
                isinstance(e, BaseExceptionGroup) and e.subgroup(_TooLarge) is not None)
            if not too_large:
                raise
            if not started:
                await self._refuse(send, received)

    async def _refuse(self, send: Any, size: int) -> None:
        body = json.dumps({"code": "request_too_large",
                           "message": f"the request body is over {self.limit:,} bytes "
                                      f"({size:,} or more); send less"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
