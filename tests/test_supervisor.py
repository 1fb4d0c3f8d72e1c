"""The supervisor restarts a process that dies, with backoff, and stops all on request."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from app.stack.supervisor import Program, Supervisor, read_procfile, this_gpuq
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


def test_a_gpuq_program_runs_this_gpuq_and_keeps_the_path_it_was_given(tmp_path):
    own = Path(sys.executable).parent / "gpuq"  # a venv's bin, not resolved through symlinks
    assert this_gpuq("gpuq worker") == f"{own} worker"
    assert this_gpuq("gpuq") == str(own)
    assert this_gpuq("gpuqx serve") == "gpuqx serve"
    assert this_gpuq("celery -A tasks.worker_app beat") == "celery -A tasks.worker_app beat"
    # The PATH of what it starts (and so of every job) is the one it was given
    out = tmp_path / "path"
    sup = Supervisor([Program("show", f"sh -c 'echo $PATH > {out}; sleep 60'")],
                     base_env={"PATH": "/usr/bin:/bin"}, stop_grace_s=2)
    sup.start()
    try:
        until(lambda: out.exists() and out.read_text().strip())
    finally:
        sup.stop()
    assert out.read_text().split() == ["/usr/bin:/bin"]
