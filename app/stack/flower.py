"""Flower, guarded: always behind a password (GPUQ_FLOWER_BASIC_AUTH, else one generated and
kept in GPUQ_HOME), never beyond loopback without one chosen, and the password never in the
process list."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from app.core.errors import FlowerAuthRequired, GpuqError
from app.core.settings import Settings

FLOWER_USER = "gpuq"  # the user of the generated password
PASSWORD_FILE = "flower.password"


def check_flower_bind(settings: Settings) -> None:
    """Refuse to serve Flower beyond loopback without a password chosen for it: it can
    revoke tasks and shows every task's arguments."""
    from app.core.security import is_loopback

    if not is_loopback(settings.flower_address) and not settings.flower_basic_auth:
        raise FlowerAuthRequired(
            f"Flower would listen on {settings.flower_address}, beyond this host, with no "
            "password: set GPUQ_FLOWER_BASIC_AUTH=user:password, or keep "
            "GPUQ_FLOWER_ADDRESS=127.0.0.1")


def password_path(settings: Settings) -> Path:
    return settings.home / PASSWORD_FILE


def flower_basic_auth(settings: Settings) -> str:
    """GPUQ_FLOWER_BASIC_AUTH, else `gpuq:` and a password generated at first use and kept
    0600 in GPUQ_HOME: on loopback too, every local user can reach Flower's port, and Flower
    can revoke tasks and shows every task's arguments."""
    if settings.flower_basic_auth:
        return settings.flower_basic_auth
    from app.core.paths import kept_secret, private_home

    path = password_path(settings)
    try:
        private_home(path.parent)
        return f"{FLOWER_USER}:{kept_secret(path)}"
    except OSError as e:
        raise GpuqError(f"cannot read or make Flower's password {path} ({e.strerror}): "
                        "run as the user who owns GPUQ_HOME, or set "
                        "GPUQ_FLOWER_BASIC_AUTH=user:password") from e


def flower_environment(settings: Settings, base: Mapping[str, str]) -> dict[str, str]:
    """Flower's environment, with its password. The password goes in FLOWER_BASIC_AUTH,
    which Flower reads, rather than --basic-auth, which anyone on the host could read in
    the process list."""
    env = dict(base)
    env["FLOWER_BASIC_AUTH"] = flower_basic_auth(settings)
    return env
