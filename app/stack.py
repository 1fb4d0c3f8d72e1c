"""`gpuq up`: the embedded Redis (unless a URL is given) plus the Procfile's processes."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from app.embedded_redis import EmbeddedRedis
from app.errors import GpuqError
from app.settings import Settings
from app.supervisor import Program, Supervisor, read_procfile
from scheduler.host import celery_command

log = logging.getLogger(__name__)


def beat_command(settings: Settings) -> str:
    settings.home.mkdir(parents=True, exist_ok=True)
    schedule = (settings.home / "beat-schedule").resolve()
    return celery_command(settings, "beat", "-s", str(schedule), "-l", settings.log_level)


def flower_command(settings: Settings) -> str:
    return celery_command(settings, "flower", f"--address={settings.flower_address}",
                          f"--port={settings.flower_port}")


def run_stack(settings: Settings, procfile: Path, flower: bool,
              jobs_file: Path | None = None) -> None:
    """Run everything in the foreground; stop all of it on Ctrl-C or SIGTERM."""
    if not procfile.is_file():
        raise GpuqError(f"no Procfile at {procfile}; run from the project root or pass "
                        "--procfile PATH")
    programs = [p for p in read_procfile(procfile) if flower or p.name != "web"]
    if jobs_file is not None:
        programs.append(Program("watch", f"gpuq watch {shlex.quote(str(jobs_file.resolve()))}"))
    embedded = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(settings)
        url = embedded.start()
        log.warning("embedded Redis at %s", url)
    try:
        Supervisor(programs).run_forever()
    finally:
        if embedded is not None:
            embedded.stop()
