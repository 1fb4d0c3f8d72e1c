"""`gpuq dashboard`: serve the web app with uvicorn."""

from __future__ import annotations

from app.core.settings import Settings
from app.dashboard.auth import check_bind


def serve(settings: Settings) -> None:
    """Serve until interrupted; refused beyond loopback without a token."""
    import uvicorn

    from app.dashboard.app import create_app

    check_bind(settings)
    uvicorn.run(create_app(settings), host=settings.dashboard_address,
                port=settings.dashboard_port, log_level=settings.log_level.lower(),
                access_log=False)
