"""The web dashboard and its JSON API over the operations layer."""

from app.dashboard.app import create_app
from app.dashboard.auth import TokenRequired, check_bind
from app.dashboard.server import serve

__all__ = ["TokenRequired", "check_bind", "create_app", "serve"]
