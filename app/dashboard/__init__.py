"""The web dashboard and its JSON API over the operations layer."""

from app.dashboard.app import create_app
from app.dashboard.auth import dashboard_token, dashboard_url, login_url
from app.dashboard.server import serve

__all__ = ["create_app", "dashboard_token", "dashboard_url", "login_url", "serve"]
