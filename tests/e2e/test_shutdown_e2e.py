"""Stopping a host stops everything it started, and one host runs one set of GPU workers.

Real processes throughout: `gpuq up` (its embedded Redis, SQLite, eight fake GPUs) or
`gpuq worker`, jobs that would run for a quarter of an hour, thousands more pending. Every
process the stack starts carries a marker in its environment, so that whatever is left after
the stop is found however it got there (reparented to init, in a session of its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session, col, select

from app.core.settings import Settings
from app.core.states import JobState
from app.store.db import make_engine
from app.store.models import Job, JobEvent
from tests.support.servers import (
    EXTERNAL_DB,
    clean_servers,
    processes_marked,
    processes_with,
    server_env,
    until,
)

pytestmark = pytest.mark.e2e
GPUQ = str(Path(sys.executable).parent / "gpuq")
MARK = "SHUTDOWN_TEST_MARK"  # jobs inherit nothing of the stack's: launches pass it on


def marked(mark: str) -> list[int]:
    """Live (not zombie) processes whose environment carries `mark`."""
    return processes_marked(MARK, mark)


def kill_marked(mark: str) -> None:
    for pid in marked(mark):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def jobs(settings: Settings) -> dict[int, tuple[str, int, int | None]]:
    """Every job: (state, attempt, pid), read from the database itself (Redis may be gone)."""
    engine = make_engine(settings)
    try:
        with Session(engine) as session:
            return {j.id: (j.state, j.attempt, j.pid)
                    for j in session.exec(select(Job).order_by(col(Job.id)))}
    finally:
        engine.dispose()


def reasons(settings: Settings, ids: list[int]) -> dict[int, list[str]]:
    """Every reason each job's history gives."""
    engine = make_engine(settings)
    found: dict[int, list[str]] = {i: [] for i in ids}
    try:
        with Session(engine) as session:
            for event in session.exec(select(JobEvent).where(col(JobEvent.job_id).in_(ids))):
                found[event.job_id].append(event.reason or "")
    finally:
        engine.dispose()
    return found


def status(env: dict[str, str]) -> dict:
    result = subprocess.run([GPUQ, "status", "--json"], env=env, capture_output=True, text=True,
                            timeout=60)
    return json.loads(result.stdout) if result.returncode == 0 else {"hosts": []}


def alive_workers(env: dict[str, str]) -> int:
    return sum(h["workers_alive"] for h in status(env)["hosts"])


def running_pids(settings: Settings) -> dict[int, int]:
    return {i: pid for i, (state, _, pid) in jobs(settings).items()
            if state == JobState.RUNNING.value and pid}


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@contextlib.contextmanager
def started(args: list[str], env: dict[str, str], log: Path, cwd: Path
            ) -> Iterator[subprocess.Popen[bytes]]:
    """A gpuq server process; whatever it leaves is killed after the test, pass or fail."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([GPUQ, *args], env=env, cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kill_marked(env[MARK])


@pytest.fixture
def shared_servers(redis_url: str) -> Iterator[str]:
    """The session's Redis and database, empty before and after: the jobs a test leaves
    pending there would otherwise run on the next test's GPUs."""
    clean_servers(redis_url)
    yield redis_url
    clean_servers(redis_url)


def host_settings(home: Path, host: str, **changes: object) -> Settings:
    """Embedded Redis and SQLite under `home` in every pass: the stack under test starts and
    stops its own servers, never the shared ones."""
    values: dict[str, object] = dict(home=home, redis_url=None, database_url=None, hostname=host,
                                     fake_gpus=8, cpu_slots=1, heartbeat_s=1, kill_grace_s=2,
                                     _env_file=None)
    values.update(changes)
    return Settings(**values)  # type: ignore[arg-type]


def stack_procfile(tmp_path: Path) -> Path:
    procfile = tmp_path / "Procfile"
    procfile.write_text("control: gpuq control-worker\nbeat: gpuq beat\ngpu: gpuq worker\n")
    return procfile


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("sig", "max_restarts"), [(signal.SIGTERM, 1), (signal.SIGINT, 0)],
                         ids=["sigterm", "sigint"])
def test_stopping_up_stops_every_process_and_records_every_running_job(tmp_path, sig,
                                                                       max_restarts):
    host = f"down{max_restarts}"
    settings = host_settings(tmp_path / "home", host)
    mark = uuid.uuid4().hex
    env = server_env(settings, **{MARK: mark})
    with started(["up", "--procfile", str(stack_procfile(tmp_path))], env,
                 tmp_path / "up.log", tmp_path) as up:
        until(lambda: alive_workers(env) == 8, 300, poll_s=1)
        launched = subprocess.run(
            [GPUQ, "launch", "--env", f"{MARK}={env[MARK]}", "-n", "3000",
             "--max-restarts", str(max_restarts), "--", "sleep", "1000"],
            env=env, capture_output=True, text=True, timeout=300)
        assert launched.returncode == 0, launched.stderr
        running = until(lambda: (found := running_pids(settings)) and len(found) == 8 and found,
                        240, poll_s=1)
        before = jobs(settings)
        pending = {i: row for i, row in before.items() if i not in running}
        assert all(state == JobState.PENDING.value for state, _, _ in pending.values())
        assert all(pid_alive(pid) for pid in running.values())
        started_by_it = set(marked(mark))
        assert set(running.values()) <= started_by_it

        up.send_signal(sig)
        # Within its stop timeout (the workers' kill grace plus the time to record each end,
        # then the servers and the broker): nothing it started is left.
        until(lambda: up.poll() is not None, 240, poll_s=0.5)
        assert until(lambda: not marked(mark), 30), [
            Path(f"/proc/{p}/cmdline").read_bytes() for p in marked(mark)]
        assert not processes_with(f"@{host}")

    after = jobs(settings)
    want = JobState.PENDING.value if max_restarts else JobState.LOST.value
    assert {i: after[i][0] for i in running} == dict.fromkeys(running, want), \
        "every running job was recorded as requeued (restarts left) or lost (none left)"
    assert {i: after[i] for i in pending} == pending, "the pending jobs are untouched"
    # Each worker stopped its own job and said why (not left it for the host to settle).
    said = reasons(settings, list(running))
    assert all(any("its worker was shut down" in why for why in whys) for whys in said.values()
               ), said


@pytest.mark.timeout(600)
def test_a_second_worker_for_the_same_host_is_refused_until_the_first_is_gone(
        tmp_path, shared_servers):
    host = "lockhost"
    settings = Settings(home=tmp_path / "home", redis_url=shared_servers,
                        database_url=EXTERNAL_DB, hostname=host, fake_gpus=2, cpu_slots=0,
                        heartbeat_s=1, kill_grace_s=2, _env_file=None)
    mark = uuid.uuid4().hex
    env = server_env(settings, **{MARK: mark})
    with started(["worker"], env, tmp_path / "first.log", tmp_path) as first:
        until(lambda: alive_workers(env) == 2, 180, poll_s=1)
        launched = subprocess.run([GPUQ, "launch", "--env", f"{MARK}={env[MARK]}", "-n", "2",
                                   "--max-restarts", "1", "--", "sleep", "1000"],
                                  env=env, capture_output=True, text=True, timeout=120)
        assert launched.returncode == 0, launched.stderr
        running = until(lambda: (found := running_pids(settings)) and len(found) == 2 and found,
                        120, poll_s=0.5)

        # A second `gpuq worker`, and a `gpuq up` that would run one, for the same host.
        other = server_env(settings, **{MARK: uuid.uuid4().hex})
        for args in (["worker"], ["up", "--procfile", str(stack_procfile(tmp_path))]):
            log = tmp_path / f"second-{args[0]}.log"
            with started(args, other, log, tmp_path) as second:
                until(lambda second=second: second.poll() is not None, 60, poll_s=0.2)
                assert second.returncode != 0
            said = log.read_text().strip().splitlines()
            assert "already runs" in said[-1] and f"pid {first.pid}" in said[-1], said
            assert "Traceback" not in "\n".join(said)
        assert first.poll() is None
        assert running_pids(settings) == running, "the first one's jobs run on, untouched"
        assert all(pid_alive(pid) for pid in running.values())

        # The first one dies without a word: the kernel drops its lock, its workers are told
        # (SIGTERM as their parent dies) and stop their jobs; then a new one may start.
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert until(lambda: not processes_with(f"@{host}") and not any(
            pid_alive(p) for p in running.values()), 120)
        after = jobs(settings)
        assert all(after[i][0] == JobState.PENDING.value for i in running), after

    third_env = server_env(settings, **{MARK: uuid.uuid4().hex})
    with started(["worker"], third_env, tmp_path / "third.log", tmp_path) as third:
        until(lambda: running_pids(settings).keys() == running.keys(), 180, poll_s=1)
        assert third.poll() is None
        third.send_signal(signal.SIGTERM)
        until(lambda: third.poll() is not None, 180, poll_s=0.5)
        assert until(lambda: not marked(third_env[MARK]), 30)


@pytest.mark.timeout(600)
def test_a_worker_that_does_not_stop_is_killed_and_its_job_still_stopped_and_settled(
        tmp_path, shared_servers):
    """A GPU worker frozen (SIGSTOP: it cannot even handle the SIGTERM) when `gpuq worker`
    stops: killed after its stop timeout, its job (in a session of its own, so not in the
    worker's group), the job's children included, is stopped all the same and settled by
    its restart policy."""
    host = "frozenhost"
    settings = Settings(home=tmp_path / "home", redis_url=shared_servers,
                        database_url=EXTERNAL_DB, hostname=host, fake_gpus=2, cpu_slots=0,
                        heartbeat_s=1, kill_grace_s=2, _env_file=None)
    env = server_env(settings, **{MARK: uuid.uuid4().hex})
    with started(["worker"], env, tmp_path / "worker.log", tmp_path) as worker:
        until(lambda: alive_workers(env) == 2, 180, poll_s=1)
        # A job whose work runs in a child of its leader: killing the leader is not enough.
        launched = subprocess.run([GPUQ, "launch", "--env", f"{MARK}={env[MARK]}", "-n", "2",
                                   "--max-restarts", "1", "--", "sh", "-c",
                                   "sleep 1000; echo done"], env=env,
                                  capture_output=True, text=True, timeout=120)
        assert launched.returncode == 0, launched.stderr
        running = until(lambda: (found := running_pids(settings)) and len(found) == 2 and found,
                        120, poll_s=0.5)
        frozen = processes_with(f"-n gpu0@{host}")
        assert len(frozen) == 1
        os.kill(frozen[0], signal.SIGSTOP)

        worker.send_signal(signal.SIGTERM)
        until(lambda: worker.poll() is not None, 240, poll_s=0.5)
        assert until(lambda: not marked(env[MARK]), 30), [
            Path(f"/proc/{p}/cmdline").read_bytes() for p in marked(env[MARK])]
    after = jobs(settings)
    assert all(after[i][0] == JobState.PENDING.value for i in running), after
    said = reasons(settings, list(running))
    assert sum(any("its worker was shut down" in why for why in whys)
               for whys in said.values()) == 1, said
    assert sum(any("its worker died" in why for why in whys) for whys in said.values()) == 1, said
