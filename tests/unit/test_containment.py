"""A job is everything it started: whatever container the host offers, a daemon the job
left behind (`setsid -f`) is gone when the executor returns, and a job may run as another
OS account."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from app.core.accounts import RunAs
from app.store.models import Job
from scheduler.worker import containment, executor
from scheduler.worker.containment import Cgroup, Container, Marked
from tests.support.servers import missing, running, until


def _v2(name: str) -> Container:
    base = containment._v2_base()
    if base is None or not containment._can_join(base):
        missing("no cgroup v2 this process may make cgroups in (root on a cgroup2 mount)")
    (base / name).mkdir(parents=True)
    return Cgroup(base / name, True, None)


def _v1(name: str) -> Container:
    base = containment._v1_base("pids")
    if base is None or not containment._can_join(base):
        missing("no cgroup v1 `pids` hierarchy this process may make cgroups in")
    (base / name).mkdir(parents=True)
    return Cgroup(base / name, False, None)


# The job id the tests' jobs carry in their environment: the mark a Marked container finds.
JOB_ID = 900_000 + os.getpid() % 100_000


def _marked(_name: str) -> Container:
    return Marked(JOB_ID, 1)


def _run(container: Container, tmp_path: Path, script: str,
         account: RunAs | None = None) -> executor.Outcome:
    job = Job(id=JOB_ID, command=script)
    env = {**os.environ, "GPUQ_JOB_ID": str(job.id), "GPUQ_ATTEMPT": "1"}
    return executor.run(job, script, env, tmp_path / "log", grace_s=1,
                        should_stop=lambda: None, on_start=lambda _pid: True,
                        container=container, account=account)


@pytest.mark.parametrize("make", [_v2, _v1, _marked], ids=["cgroup-v2", "cgroup-v1", "marked"])
def test_a_daemon_the_job_left_is_gone_when_the_executor_returns(
        make: Callable[[str], Container], tmp_path: Path):
    container = make(f"test-{os.getpid()}-{tmp_path.name}")
    pidfile = tmp_path / "daemon.pid"
    # A job that starts a daemon in a session of its own, and ends
    outcome = _run(container, tmp_path, f"setsid -f bash -c 'echo $$ > {pidfile}; "
                   f"exec sleep 300'; until [ -s {pidfile} ]; do sleep 0.01; done")
    # Then the job succeeded, and its daemon was killed before the executor returned
    assert outcome.exit_code == 0, (tmp_path / "log").read_text()
    daemon = int(pidfile.read_text())
    assert not running(daemon), f"daemon {daemon} outlived its job"
    if isinstance(container, Cgroup):
        assert not container.path.exists(), "the job's cgroup is removed"


def test_a_cgroup_v2_reads_the_cpu_the_job_used(tmp_path: Path):
    container = _v2(f"cpu-{os.getpid()}")
    outcome = _run(container, tmp_path, "python3 -c 'sum(range(3_000_000))'")
    assert outcome.exit_code == 0
    assert outcome.usage is not None and outcome.usage.cpu_s is not None
    assert outcome.usage.cpu_s > 0


def test_a_job_runs_as_its_owners_account_with_its_home(tmp_path: Path, other_user: str):
    if shutil.which("setpriv") is None:
        missing("setpriv (util-linux) runs a job as another account")
    account = RunAs.of(pwd.getpwnam(other_user))
    shared = Path(tempfile.mkdtemp(prefix="gpuq-as-"))  # /tmp's: the other account reaches it
    try:
        shared.chmod(0o777)
        out = shared / "who"
        outcome = _run(_marked("who"), tmp_path,
                       f"echo $(id -u) $HOME $USER > {out}; cat /proc/1/environ; echo read=$?",
                       account=account)
        assert outcome.exit_code == 0, (tmp_path / "log").read_text()
        assert out.read_text().split() == [str(account.uid), account.home, account.name]
        assert out.stat().st_uid == account.uid, "what the job writes is its owner's"
        assert "read=1" in (tmp_path / "log").read_text(), "root's environ stays closed"
    finally:
        shutil.rmtree(shared)


def test_a_sweep_removes_a_hosts_stale_empty_cgroups_and_no_other(tmp_path: Path):
    base = containment._v2_base()
    if base is None or not containment._can_join(base):
        missing("no cgroup v2 this process may make cgroups in (root on a cgroup2 mount)")
    host = f"sweep{os.getpid()}"
    stale, fresh, busy = (base / f"{host}-{n}-1" for n in (1, 2, 3))
    for directory in (stale, fresh, busy):
        directory.mkdir(parents=True)
    os.utime(stale, (time.time() - 600, time.time() - 600))
    os.utime(busy, (time.time() - 600, time.time() - 600))
    holder = subprocess.Popen(["/bin/sh", "-c", containment.JOIN, "sh",
                               str(busy / "cgroup.procs"), "sleep", "60"])
    try:
        until(lambda: Cgroup(busy, True, None).pids())
        # When a worker of that host sweeps
        containment.sweep(host)
        # Then only the stale empty one is gone: not one just made, nor one a job runs in
        assert not stale.exists() and fresh.exists() and busy.exists()
    finally:
        holder.kill()
        holder.wait()
        for directory in (fresh, busy):
            Cgroup(directory, True, None).kill_all()
            directory.rmdir()
