"""The dashboard's web app: the JSON API, the pages, and gpuq's errors as HTTP answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError

from app.client import Client
from app.core import errors
from app.core.settings import Settings
from app.dashboard import api, metrics, pages
from app.dashboard.auth import (
    Identify,
    either,
    owner_identity,
    token_middleware,
)
from app.dashboard.bodies import valid_unicode
from app.dashboard.guard import AllowedHosts, Guard
from app.dashboard.limits import BodyLimit
from app.store import users

STATIC_DIR = Path(__file__).parent / "static"
HTTP_STATUS: dict[type[errors.GpuqError], int] = {
    errors.JobNotFound: 404, errors.LaunchNotFound: 404, errors.DuplicateJob: 409,
    errors.NotPermitted: 403, errors.InvalidToken: 401, errors.OverLimit: 429,
    errors.PayloadTooLarge: 413, errors.BrokerUnavailable: 503,
    errors.DatabaseUnavailable: 503, errors.OperationTimeout: 503,
    errors.HomeNotWritable: 503, errors.DiskFull: 507,
}


def http_status(error: errors.GpuqError) -> int:
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 400


def create_app(settings: Settings, client: Client | None = None,
               identify: Identify | None = None) -> FastAPI:
    """The dashboard over `client` (by default one on `settings` and its transport).
    Every request shows a token: the dashboard's own (`auth.dashboard_token`) stands for the
    stack's owner; any other is asked of `identify`, by default the named users
    (`gpuq user add`)."""
    # The dashboard serves the http transport: it never is a client of it itself.
    own = client or Client(settings, settings.transport)
    hosts = AllowedHosts.of(settings)
    who = either(owner_identity(settings),
                 identify or (lambda token: users.actor_for_token(own.rt.engine, token)))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if client is None:
            own.close()

    app = FastAPI(title="gpuq dashboard", version="1", lifespan=lifespan,
                  description="Jobs, launches, GPUs and logs over gpuq's operations layer.",
                  dependencies=[Depends(valid_unicode)])
    app.state.client = own
    app.state.settings = settings
    app.include_router(api.router)
    app.include_router(pages.router)
    app.state.metrics = metrics.registry_for(own)
    app.include_router(metrics.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.middleware("http")(token_middleware(who))
    app.add_middleware(BodyLimit)
    # Outermost: a request for a foreign host or from a foreign origin is refused before
    # anything else reads it, and every answer carries the security headers.
    app.add_middleware(Guard, hosts=hosts, port=settings.dashboard_port)

    def state_fault(error: Exception) -> errors.GpuqError | None:
        return errors.state_fault(error, settings.home, settings.sqlite_file)

    @app.exception_handler(SQLAlchemyError)
    @app.exception_handler(OSError)
    async def on_disk(request: Request, error: Exception) -> Response:
        """A home that cannot be written, a full disk, a damaged SQLite file: 503 with the
        line that names it; anything else stays the server's error it is."""
        fault = state_fault(error)
        if fault is None:
            raise error
        return await refused(request, fault)

    @app.exception_handler(errors.GpuqError)
    async def refused(request: Request, error: errors.GpuqError) -> Response:
        if isinstance(error, errors.DatabaseUnavailable | errors.BrokerUnavailable):
            error = state_fault(error) or error
        status = http_status(error)
        if request.url.path.startswith("/api/") or request.url.path == "/metrics":
            return JSONResponse({"code": error.code, "message": str(error)}, status_code=status)
        return pages.templates.TemplateResponse(request, "error.html", {"error": error},
                                                status_code=status)

    return app
