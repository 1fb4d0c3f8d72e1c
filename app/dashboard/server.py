"""`gpuq dashboard`: serve the web app with uvicorn, on its address and port and on a unix
socket in GPUQ_HOME that only the home's owner may connect to, which the owner's everyday
commands use while the stack runs (app/client/http.py)."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

from app.core.envvars import DASHBOARD_SOCKET
from app.core.paths import private_home
from app.core.procgroup import undumpable
from app.core.settings import Settings
from app.dashboard.auth import dashboard_token, dashboard_url

log = logging.getLogger(__name__)


def serve(settings: Settings) -> None:
    """Say where the dashboard answers (never its token: this output goes to terminals,
    logs and CI), then serve until interrupted."""
    import uvicorn

    from app.dashboard.app import create_app

    undumpable()

    app = create_app(settings)
    dashboard_token(settings)  # made now, so that a home it cannot use fails before serving
    print(f"gpuq dashboard at {dashboard_url(settings)}; `gpuq dashboard --url` prints your login "
          "address", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=settings.dashboard_address, port=settings.dashboard_port,
                            log_level=settings.log_level.lower(), access_log=False)
    sockets = [config.bind_socket()]
    path = settings.home / DASHBOARD_SOCKET
    own = owner_socket(path)
    if own is not None:
        sockets.append(own)
        bound = path.stat().st_ino
    try:
        uvicorn.Server(config).run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
        if own is not None:
            _remove_if_same(path, bound)


def owner_socket(path: Path) -> socket.socket | None:
    """A listening unix socket at `path`, 0600 in the private home; None where another
    dashboard of this home answers there already, or the path is too long for a socket
    (the commands then run in process)."""
    private_home(path.parent)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        pass  # nobody answers: a socket left by a killed dashboard, or none
    else:
        log.warning("another dashboard of %s answers on %s; serving without it",
                    path.parent, path)
        return None
    finally:
        probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(128)
    except OSError as e:  # e.g. a home path longer than a socket's name may be
        log.warning("cannot serve the owner's socket %s (%s); the everyday commands will run "
                    "in process", path, e)
        sock.close()
        return None
    return sock


def _remove_if_same(path: Path, inode: int) -> None:
    """Remove the socket file unless another dashboard has bound its own there since."""
    try:
        if path.stat().st_ino == inode:
            path.unlink()
    except OSError:
        pass
