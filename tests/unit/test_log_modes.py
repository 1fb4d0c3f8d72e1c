"""gpuq's logs (a job's, the demo's stack log) are their owner's from the moment they exist:
made 0600 whatever the umask, not opened and closed again afterwards."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.backends import adapter_classes
from app.core.logcap import CappedLog
from app.core.paths import JobPaths, open_log
from tests.contract.test_adapters import drive


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that would leave new files readable by every user."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_log_opened_to_append_is_made_0600(tmp_path, open_umask):
    with open_log(tmp_path / "stack.log") as log:
        log.write(b"started\n")
    assert _mode(tmp_path / "stack.log") == 0o600
    with open_log(tmp_path / "stack.log") as log:  # appended to, not replaced
        log.write(b"again\n")
    assert (tmp_path / "stack.log").read_bytes() == b"started\nagain\n"


def test_a_jobs_capped_log_is_made_0600(tmp_path, open_umask):
    log = CappedLog(tmp_path / "1.log", 1 << 20)
    log.write(b"a job's output\n")
    os.close(log.fd)
    assert _mode(tmp_path / "1.log") == 0o600


def test_the_process_backends_job_log_is_made_0600(rt, local, open_umask):
    adapter = adapter_classes()["process"]()
    adapter.rt = rt
    job = local.submit("echo private output", backend="process")
    drive(adapter, local, [job.id])
    log = JobPaths(rt.settings.home, job.id).log
    assert "private output" in log.read_text()
    assert _mode(log) == 0o600
