"""`gpuq up`: the embedded Redis (unless a URL is given) plus the Procfile's processes.

The embedded Redis starts first and is supervised like the Procfile's programs: killed (by
the OOM killer, say), it is started again on its port, with its password and the data of its
append-only file, and its exits show in `gpuq status` as any program's do.

On Ctrl-C (SIGINT) or SIGTERM nothing is started again, and everything stops in order: the
host's workers first (`gpuq worker`, which stops its jobs and records how each ended), then
the other servers, then the embedded Redis, then whatever is left of its process tree.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from app.core.errors import GpuqError
from app.core.procgroup import undumpable
from app.core.security import require_secret
from app.core.settings import Settings, mask_url
from app.runtime import Runtime
from app.stack import reaper
from app.stack.commands import host_stop_timeout_s, is_host_worker
from app.stack.hostlock import HostLock
from app.stack.supervisor import Program, Supervisor, read_procfile
from app.store.embedded_redis import EmbeddedRedis
from app.store.exits import RestartLog

log = logging.getLogger(__name__)

DEV_PROCFILE = Path("deploy") / "Procfile.dev"
REDIS_PROGRAM = "redis"  # the embedded server's name in `gpuq status`
REDIS_STOP_STAGE = 2  # after the workers (0) and the other servers (1), which use it
REDIS_STOP_TIMEOUT_S = 10.0


def default_procfile() -> Path:
    """deploy/Procfile.dev of the working directory, else of the source tree."""
    if DEV_PROCFILE.is_file():
        return DEV_PROCFILE
    return Path(__file__).resolve().parents[2] / DEV_PROCFILE


def stack_programs(settings: Settings, procfile: Path, flower: bool,
                   jobs_file: Path | None = None) -> list[Program]:
    """The Procfile's programs; `gpuq worker` stops first, with the time its jobs need."""
    programs = [p for p in read_procfile(procfile) if flower or p.name != "web"]
    if jobs_file is not None:
        programs.append(Program("watch", f"gpuq watch {shlex.quote(str(jobs_file.resolve()))}"))
    for program in programs:
        if is_host_worker(program.command):
            program.stop_stage = 0
            program.stop_timeout_s = host_stop_timeout_s(settings)
    return programs


def run_stack(settings: Settings, procfile: Path, flower: bool,
              jobs_file: Path | None = None) -> None:
    """Run everything in the foreground; stop all of it on Ctrl-C or SIGTERM."""
    undumpable()
    if not procfile.is_file():
        raise GpuqError(f"no Procfile at {procfile}; run from the project root or pass "
                        "--procfile PATH")
    programs = stack_programs(settings, procfile, flower, jobs_file)
    if any(is_host_worker(p.command) for p in programs):
        # Workers beyond loopback without GPUQ_SECRET would refuse one by one, restarted
        # on backoff: say it once, before anything starts.
        require_secret(settings)
    lock = None
    if any(is_host_worker(p.command) for p in programs):
        # A second stack for this host would take the first one's running jobs for orphans.
        lock = HostLock(settings, "gpuq up")
        lock.acquire()
    rt = Runtime(settings)
    # Before anything starts: a database this gpuq cannot use stops `gpuq up` with one line
    # instead of every program of the Procfile crash-looping on it.
    rt.check_database()
    # PORT is honcho's per-process port; here Flower and the dashboard take their settings.
    env = {k: v for k, v in os.environ.items() if k != "PORT"}
    fds: tuple[int, ...] = ()
    if lock is not None and lock.fd is not None:
        env.update(lock.child_env())
        fds = (lock.fd,)
    supervisor = Supervisor(programs, base_env=env, pass_fds=fds,
                            on_exit=RestartLog(lambda: rt.redis, settings.hostname))
    embedded = None
    with supervisor.stopped_by_signals():
        try:
            if not settings.redis_url:
                embedded = EmbeddedRedis(settings)
                url = embedded.start()
                log.warning("embedded Redis at %s", mask_url(url))
                if embedded.proc is not None:  # not one that another process owns
                    supervisor.adopt(Program(
                        REDIS_PROGRAM, "the embedded Redis", stop_stage=REDIS_STOP_STAGE,
                        stop_timeout_s=REDIS_STOP_TIMEOUT_S, spawn=embedded.restart),
                        embedded.proc)
            if not supervisor.stopping:
                supervisor.supervise()
        finally:
            supervisor.stop()
            rt.close()
            if embedded is not None:
                embedded.stop()
            reaper.sweep()
