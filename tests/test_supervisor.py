"""The supervisor restarts a process that dies, with backoff, and stops all on request."""

from __future__ import annotations

import os

from app.stack.supervisor import Program, Supervisor, read_procfile
from tests.conftest import until


def test_dead_process_is_restarted_and_the_others_keep_running(tmp_path):
    starts = tmp_path / "starts"
    sup = Supervisor([
        Program("flaky", f"sh -c 'echo x >> {starts}; exit 3'"),
        Program("steady", "sleep 60"),
    ], stop_grace_s=2)
    sup.start()
    steady_pid = sup.children[1].proc.pid
    try:
        until(lambda: (sup.poll() or True) and starts.exists()
                     and len(starts.read_text().split()) >= 3)
        assert sup.children[0].restarts >= 2
        assert sup.children[0].backoff_s > 0.5, "repeated crashes back off"
        assert sup.children[1].proc.pid == steady_pid
    finally:
        sup.stop()
    try:
        os.kill(steady_pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive


def test_procfile_is_read_with_honcho(tmp_path):
    path = tmp_path / "Procfile"
    path.write_text("web: gpuq flower\ngpu: gpuq worker\n")
    assert [(p.name, p.command) for p in read_procfile(path)] == [
        ("web", "gpuq flower"), ("gpu", "gpuq worker")]
