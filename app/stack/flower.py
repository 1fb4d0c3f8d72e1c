"""Flower, guarded: never beyond loopback without a password, and the password never in
the process list."""

from __future__ import annotations

from collections.abc import Mapping

from app.core.errors import FlowerAuthRequired
from app.core.settings import Settings


def check_flower_bind(settings: Settings) -> None:
    """Refuse to serve Flower beyond loopback without a password: it can revoke tasks and
    shows every task's arguments."""
    from app.core.security import is_loopback

    if not is_loopback(settings.flower_address) and not settings.flower_basic_auth:
        raise FlowerAuthRequired(
            f"Flower would listen on {settings.flower_address}, beyond this host, with no "
            "password: set GPUQ_FLOWER_BASIC_AUTH=user:password, or keep "
            "GPUQ_FLOWER_ADDRESS=127.0.0.1")


def flower_environment(settings: Settings, base: Mapping[str, str]) -> dict[str, str]:
    """Flower's environment. The password goes in FLOWER_BASIC_AUTH, which Flower reads,
    rather than --basic-auth, which anyone on the host could read in the process list."""
    env = dict(base)
    if settings.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    return env
