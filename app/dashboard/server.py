"""`gpuq dashboard`: serve the web app with uvicorn."""

from __future__ import annotations

import sys

from app.core.settings import Settings
from app.dashboard.auth import dashboard_token, login_url


def serve(settings: Settings) -> None:
    """Print the owner's login address, then serve until interrupted."""
    import uvicorn

    from app.dashboard.app import create_app

    app = create_app(settings)
    print(f"gpuq dashboard: open {login_url(settings, dashboard_token(settings))}",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=settings.dashboard_address, port=settings.dashboard_port,
                log_level=settings.log_level.lower(), access_log=False)
