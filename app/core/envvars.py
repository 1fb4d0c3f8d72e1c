"""The few settings the everyday commands need before they know where to send an operation,
read as Settings reads them (`GPUQ_*` variables, whatever their case, over a `.env` file in
the working directory) but without loading pydantic, which costs more than the rest of the
command together (app/client/http.py `endpoint_from_environment`).

Settings takes every default it shares with this module from here. A value this module
cannot read (a timeout that is no number) is left to Settings, which names the fix.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

PREFIX = "gpuq_"
DEFAULT_HOME = ".gpuq"
DEFAULT_TOKEN_FILE = "~/.config/gpuq/token"
DEFAULT_OP_TIMEOUT_S = 30.0
# Under the home: the dashboard's token (it names the stack's owner) and the unix socket
# the stack's dashboard also listens on, which only the home's owner may connect to.
DASHBOARD_TOKEN_FILE = "dashboard.token"
DASHBOARD_SOCKET = "dashboard.sock"


@cache
def _values() -> dict[str, str]:
    values: dict[str, str] = {}
    if Path(".env").is_file():
        from dotenv import dotenv_values  # what pydantic-settings reads it with

        values.update((k.lower(), v) for k, v in dotenv_values(".env").items()
                      if v is not None)
    values.update((k.lower(), v) for k, v in os.environ.items())
    return values


def setting(name: str) -> str | None:
    """GPUQ_NAME as given, or None when neither the environment nor .env sets it."""
    return _values().get(PREFIX + name)


def home() -> Path:
    """GPUQ_HOME, absolute, as Settings makes it."""
    return Path(setting("home") or DEFAULT_HOME).expanduser().resolve()


def op_timeout_s() -> float | None:
    """GPUQ_OP_TIMEOUT_S; None when it is no positive number (Settings will say so)."""
    given = setting("op_timeout_s")
    if given is None:
        return DEFAULT_OP_TIMEOUT_S
    try:
        value = float(given)
    except ValueError:
        return None
    return value if value > 0 else None
