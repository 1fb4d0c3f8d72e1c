"""Who may use the dashboard: anyone on loopback, or whoever shows the token."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse

from app.core.errors import TokenRequired
from app.core.identity import Actor, stack_owner
from app.core.security import is_loopback
from app.core.settings import Settings

COOKIE = "gpuq_dashboard_token"


def check_bind(settings: Settings) -> None:
    """Refuse to serve beyond loopback without a token: jobs run commands on GPU hosts."""
    if not is_loopback(settings.dashboard_address) and not settings.dashboard_token:
        raise TokenRequired(
            f"the dashboard would listen on {settings.dashboard_address}, beyond this host, "
            "with no token: set GPUQ_DASHBOARD_TOKEN, or keep GPUQ_DASHBOARD_ADDRESS=127.0.0.1")


def token_middleware(token: str, identify: Callable[[str], Actor | None] | None = None
                     ) -> Callable[
        [Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    """Accept `Authorization: Bearer TOKEN`, the cookie, or `?token=` (which sets the
    cookie and redirects to the same page without it, so it leaves the address bar): the
    stack's owner. A named user's token (`identify` finds its user) is accepted as Bearer
    and the request acts for that user (request.state.actor)."""
    async def check(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                    ) -> Response:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(given, token):
            request.state.actor = stack_owner()
            return await call_next(request)
        if scheme.lower() == "bearer" and identify is not None and given:
            actor = await run_in_threadpool(identify, given)
            if actor is not None:
                request.state.actor = actor
                return await call_next(request)
        if secrets.compare_digest(request.cookies.get(COOKIE, ""), token):
            return await call_next(request)
        if secrets.compare_digest(request.query_params.get("token", ""), token):
            params = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.replace_query_params(**dict(params)) if params else \
                request.url.remove_query_params("token")
            response = RedirectResponse(str(target), status_code=303)
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return response
        return JSONResponse({"code": "unauthorized", "message": "this dashboard needs its "
                             "token: open it as /?token=TOKEN or send Authorization: Bearer "
                             "TOKEN (GPUQ_DASHBOARD_TOKEN)"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
    return check
