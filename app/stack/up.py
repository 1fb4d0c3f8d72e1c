"""`gpuq up`: the embedded Redis (unless a URL is given) plus the Procfile's processes."""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Mapping
from pathlib import Path

from app.core.errors import FlowerAuthRequired, GpuqError
from app.core.settings import Settings
from app.runtime import Runtime
from app.stack.host import celery_command
from app.stack.supervisor import Program, Supervisor, read_procfile
from app.store.embedded_redis import EmbeddedRedis
from app.store.exits import RestartLog

log = logging.getLogger(__name__)

DEV_PROCFILE = Path("deploy") / "Procfile.dev"


def beat_command(settings: Settings) -> str:
    settings.home.mkdir(parents=True, exist_ok=True)
    schedule = (settings.home / "beat-schedule").resolve()
    return celery_command(settings, "beat", "-s", str(schedule), "-l", settings.log_level)


def flower_command(settings: Settings) -> str:
    return celery_command(settings, "flower", f"--address={settings.flower_address}",
                          f"--port={settings.flower_port}")


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


def default_procfile() -> Path:
    """deploy/Procfile.dev of the working directory, else of the source tree."""
    if DEV_PROCFILE.is_file():
        return DEV_PROCFILE
    return Path(__file__).resolve().parents[2] / DEV_PROCFILE


def run_stack(settings: Settings, procfile: Path, flower: bool,
              jobs_file: Path | None = None) -> None:
    """Run everything in the foreground; stop all of it on Ctrl-C or SIGTERM."""
    if not procfile.is_file():
        raise GpuqError(f"no Procfile at {procfile}; run from the project root or pass "
                        "--procfile PATH")
    programs = [p for p in read_procfile(procfile) if flower or p.name != "web"]
    if jobs_file is not None:
        programs.append(Program("watch", f"gpuq watch {shlex.quote(str(jobs_file.resolve()))}"))
    rt = Runtime(settings)
    # Before anything starts: a database this gpuq cannot use stops `gpuq up` with one line
    # instead of every program of the Procfile crash-looping on it.
    rt.check_database()
    embedded = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(settings)
        url = embedded.start()
        log.warning("embedded Redis at %s", url)
    # PORT is honcho's per-process port; here Flower and the dashboard take their settings.
    env = {k: v for k, v in os.environ.items() if k != "PORT"}
    try:
        Supervisor(programs, base_env=env,
                   on_exit=RestartLog(lambda: rt.redis, settings.hostname)).run_forever()
    finally:
        rt.close()
        if embedded is not None:
            embedded.stop()
