"""What the tests share besides fixtures: the servers they run on (real Redis, a real
database, real worker processes), waiting for a condition, acting as a second OS
user, and skipping or failing for a missing program."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import redis
from sqlalchemy import text
from sqlmodel import SQLModel

from app.core.procgroup import stop_groups
from app.core.settings import Settings
from app.ops.registry import call_local
from app.runtime import Runtime

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
EXTERNAL_REDIS = os.environ.get("GPUQ_REDIS_URL")
EXTERNAL_DB = os.environ.get("GPUQ_DATABASE_URL")
ROOT = Path(__file__).resolve().parents[2]
# Stand-ins for checks that need GPUs: one passes, one fails, one skips.
PREFLIGHT_FAKES = {"fake-pass": "echo all good", "fake-fail": "echo broken link >&2; exit 1",
                   "fake-skip": "echo no devices here; exit 3"}


def missing(why: str) -> NoReturn:
    """A program or privilege a test needs is not here: skip it on a developer's machine,
    fail it in CI, which installs everything the tests drive (.ci/run)."""
    if IN_CI:
        pytest.fail(f"{why} (CI must provide it: .ci/run installs what the tests drive)")
    pytest.skip(why)


def until(predicate, timeout_s: float = 30, poll_s: float = 0.1,  # type: ignore[no-untyped-def]
          describe=None):
    """The first truthy value of `predicate()`, polled until `timeout_s`; else fail, with
    what `describe()` says of the state the condition was waiting on."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    seen = f": {describe()}" if describe is not None else ""
    raise AssertionError(f"condition not reached in {timeout_s}s{seen}")


def clean_servers(redis_url: str) -> None:
    """An empty Redis database and empty tables (when the database is an external one)."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    if EXTERNAL_DB:
        _reset_database(EXTERNAL_DB)


def _reset_database(url: str) -> None:
    from app.store.db import make_engine

    engine = make_engine(Settings(database_url=url, _env_file=None))
    with engine.begin() as conn:
        names = ", ".join(t.name for t in SQLModel.metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()


def server_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a gpuq server process that shares this test's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUQ_")}
    env.update(settings.as_environment())
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(extra)
    return env


class Stack:
    """`gpuq worker` and `gpuq control-worker` as real processes."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *commands: str) -> None:
        gpuq = str(Path(sys.executable).parent / "gpuq")
        for command in commands:
            log = open(self.log_dir / f"{command}.log", "ab")  # noqa: SIM115
            self.procs.append(subprocess.Popen(
                [gpuq, command], env=server_env(self.settings), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, cwd=self.log_dir))
            log.close()

    @contextlib.contextmanager
    def up(self, gpus: int) -> Iterator[Stack]:
        """A whole stack (GPU worker, control worker, beat), ready, then stopped."""
        self.start("worker", "control-worker", "beat")
        rt = Runtime(self.settings)
        try:
            self.wait_ready(rt, gpus=gpus)
            yield self
        finally:
            rt.close()
            self.stop()

    def wait_ready(self, rt: Runtime, gpus: int, timeout_s: float = 60,
                   control: bool = True) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            hosts = call_local(rt, "status", {})["hosts"]
            alive = sum(h["workers_alive"] for h in hosts)
            if alive >= gpus and (not control or self._control_ready(rt)):
                return
            time.sleep(0.3)
        raise AssertionError(f"workers not ready in {timeout_s}s; see {self.log_dir}")

    def _control_ready(self, rt: Runtime) -> bool:
        replies = rt.celery.control.ping(timeout=0.5) or []
        return any(name.startswith("control@") for reply in replies for name in reply)

    def stop(self) -> None:
        import signal

        stop_groups(self.procs, grace_s=20)
        # Celery workers run in sessions of their own: none may outlive its stack and take
        # the next test module's messages.
        for pid in processes_with(f"@{self.settings.hostname}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def gpuq_up(settings: Settings, cwd: Path, workers: int,
            flower: bool = False) -> Iterator[dict[str, str]]:
    """`gpuq up` (the root Procfile, Flower only if asked) as a process of its own, its
    output (stdout and stderr) in `cwd`/up.log, until `workers` GPU workers are alive;
    yields the environment that reaches it, and stops it with SIGTERM at the end."""
    import json
    import signal

    gpuq = str(Path(sys.executable).parent / "gpuq")
    env = server_env(settings)
    log_path = cwd / "up.log"
    with open(log_path, "wb") as log:
        up = subprocess.Popen([gpuq, "up", "--flower" if flower else "--no-flower",
                               "--procfile", str(ROOT / "Procfile")],
                              env=env, cwd=cwd, start_new_session=True, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        def alive() -> int:
            shown = subprocess.run([gpuq, "status", "--json"], env=env, capture_output=True,
                                   text=True, timeout=60)
            hosts = json.loads(shown.stdout)["hosts"] if shown.returncode == 0 else []
            return sum(h["workers_alive"] for h in hosts)

        until(lambda: alive() == workers, 90, describe=lambda: log_path.read_text()[-2000:])
        yield env
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        up.wait(timeout=60)


def running(pid: int) -> bool:
    """Whether process `pid` runs: neither gone nor a zombie nobody reaped (a test's
    container may have an init that reaps no one)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_with(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line contains `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            zombie = " Z " in (proc / "stat").read_text()
        except (OSError, ValueError):
            continue
        if marker in cmdline and "pytest" not in cmdline and not zombie:
            found.append(int(proc.name))
    return found


def processes_marked(variable: str, value: str) -> list[int]:
    """Live (not zombie) processes whose environment holds `variable=value`: what a stack
    started, jobs included, found by a mark its test put in the stack's environment."""
    needle = f"{variable}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if needle in environ.split(b"\0") and stat[stat.rindex(")") + 2] != "Z":
            found.append(int(proc.name))
    return found


OTHER_USER = "gpuq-other"


def as_other(user: str, *argv: str, timeout_s: float = 30) -> subprocess.CompletedProcess[bytes]:
    """Run a command as `user` (made by `other_user`)."""
    return subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True,
                          timeout=timeout_s)
