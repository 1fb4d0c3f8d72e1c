"""Who may use the dashboard: whoever shows a token that names an actor. There is always a
token: GPUQ_DASHBOARD_TOKEN, or one generated at first start and kept 0600 in GPUQ_HOME."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from urllib.parse import quote

from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse

from app.core.envvars import DASHBOARD_TOKEN_FILE
from app.core.errors import GpuqError
from app.core.identity import Actor, stack_owner
from app.core.paths import kept_secret, private_home
from app.core.security import reachable_host
from app.core.settings import Settings

COOKIE = "gpuq_dashboard_token"
# An identity source: the actor a token names, or None for a token nobody holds. It may
# read the database: the middleware calls it off the event loop.
Identify = Callable[[str], Actor | None]
Handler = Callable[[Request], Awaitable[Response]]


def token_path(settings: Settings) -> Path:
    return settings.home / DASHBOARD_TOKEN_FILE


def dashboard_token(settings: Settings) -> str:
    """GPUQ_DASHBOARD_TOKEN, else the token kept in GPUQ_HOME, made on first use."""
    if settings.dashboard_token:
        return settings.dashboard_token
    path = token_path(settings)
    try:
        private_home(path.parent)
        token = kept_secret(path)
    except OSError as e:
        raise GpuqError(f"cannot read or make the dashboard's token {path} ({e.strerror}): "
                        "run as the user who owns GPUQ_HOME, or set GPUQ_DASHBOARD_TOKEN"
                        ) from e
    return token


def owner_identity(settings: Settings) -> Identify:
    """Knows one token, the dashboard's, which names the stack's owner. The token is read
    (or made) at the first request, not when the app is built."""
    expected: list[bytes] = []

    def identify(given: str) -> Actor | None:
        if not expected:
            expected.append(dashboard_token(settings).encode())
        if given and secrets.compare_digest(given.encode(), expected[0]):
            return stack_owner()
        return None
    return identify


def either(first: Identify, then: Identify | None) -> Identify:
    """`first`'s actor for a token, else `then`'s."""
    if then is None:
        return first

    def identify(given: str) -> Actor | None:
        return first(given) or then(given)
    return identify


def dashboard_url(settings: Settings) -> str:
    """Where the dashboard answers, as this host reaches it: no token in it, so that it may
    be printed and logged."""
    return f"http://{reachable_host(settings.dashboard_address)}:{settings.dashboard_port}"


def login_url(settings: Settings, token: str) -> str:
    """The address the owner opens once in a browser to sign in (`gpuq dashboard --url`)."""
    return f"{dashboard_url(settings)}/?token={quote(token, safe='')}"


def token_middleware(identify: Identify) -> Callable[[Request, Handler], Awaitable[Response]]:
    """Accept `Authorization: Bearer TOKEN`, the cookie, or `?token=` (which sets the
    cookie and redirects to the same page without it, so it leaves the address bar); put
    the actor the token names on `request.state.actor`, and on `request.state.recheck` a
    function that asks again whether the token still names them (a long response, such
    as a log stream, calls it off the event loop and ends once it says no)."""
    async def check(request: Request, call_next: Handler) -> Response:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        shown = [given.strip()] if scheme.lower() == "bearer" and given.strip() else []
        shown += [request.cookies[COOKIE]] if request.cookies.get(COOKIE) else []
        for token in shown:
            actor = await run_in_threadpool(identify, token)
            if actor is not None:
                request.state.actor = actor
                request.state.recheck = partial(_still_names, identify, token, actor)
                return await call_next(request)
        query = request.query_params.get("token", "")
        if request.method in ("GET", "HEAD") and query and \
                await run_in_threadpool(identify, query) is not None:
            params = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.replace_query_params(**dict(params)) if params else \
                request.url.remove_query_params("token")
            response = RedirectResponse(str(target), status_code=303)
            response.set_cookie(COOKIE, query, httponly=True, samesite="strict")
            return response
        return JSONResponse({"code": "unauthorized", "message": "this dashboard needs a "
                             "token: open the address `gpuq dashboard --url` prints, or send "
                             "Authorization: Bearer TOKEN"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
    return check


def _still_names(identify: Identify, token: str, actor: Actor) -> bool:
    """True while `token` names `actor`: not revoked, replaced nor expired since."""
    return identify(token) == actor
