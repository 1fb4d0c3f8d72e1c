"""The dashboard as a test reaches it: at an address it answers to, showing its token."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.dashboard import dashboard_token

BASE_URL = "http://127.0.0.1:5556"


def bearer(app: FastAPI) -> dict[str, str]:
    """The header that shows `app`'s own token (the stack owner's)."""
    return {"Authorization": f"Bearer {dashboard_token(app.state.settings)}"}


def dashboard_client(app: FastAPI, **kwargs: Any) -> TestClient:
    """A test client of the dashboard `app` that signs in with the owner's token."""
    return TestClient(app, base_url=BASE_URL, headers=bearer(app), **kwargs)
