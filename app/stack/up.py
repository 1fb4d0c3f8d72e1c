"""`gpuq up`: the embedded Redis (unless a URL is given) plus the Procfile's processes."""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from app.core.errors import GpuqError
from app.core.settings import Settings
from app.runtime import Runtime
from app.stack.supervisor import Program, Supervisor, read_procfile
from app.store.embedded_redis import EmbeddedRedis
from app.store.exits import RestartLog

log = logging.getLogger(__name__)

DEV_PROCFILE = Path("deploy") / "Procfile.dev"


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
