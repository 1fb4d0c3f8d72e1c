"""The supervisor restarts a process that dies, with backoff, and stops all on request."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from app.stack.supervisor import Program, Supervisor, read_procfile, this_gpuq
from tests.support.servers import until


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


def test_nothing_is_started_again_once_a_stop_began(tmp_path):
    starts = tmp_path / "starts"
    sup = Supervisor([Program("flaky", f"sh -c 'echo x >> {starts}; exit 3'")], stop_grace_s=2)
    sup.start()
    try:
        child = sup.children[0]
        assert child.proc is not None
        until(lambda: child.proc.poll() is not None)
        sup.request_stop()  # what SIGINT or SIGTERM does
        child.restart_at = 0.0  # its backoff is over: only the stop holds it back
        sup.poll()
        assert child.proc is None or child.proc.poll() is not None
    finally:
        sup.stop()
    assert starts.read_text().split() == ["x"], "it was started once, never again"


def test_stop_goes_stage_by_stage_and_gives_each_program_its_own_timeout(tmp_path):
    """The workers (stage 0) have ended, however long they take within their timeout, before
    the servers (stage 1) are told to stop; a program past its timeout is killed."""
    order = tmp_path / "order"
    slow_worker = (f"sh -c 'trap \"sleep 1; echo worker-ended >> {order}; exit 0\" TERM; "
                   "while true; do sleep 0.1; done'")
    server = (f"sh -c 'trap \"echo server-told >> {order}; exit 0\" TERM; "
              "while true; do sleep 0.1; done'")
    stuck = "sh -c 'trap \"\" TERM; while true; do sleep 0.1; done'"
    sup = Supervisor([Program("server", server),
                      Program("worker", slow_worker, stop_timeout_s=60, stop_stage=0),
                      Program("stuck", stuck, stop_timeout_s=1, stop_stage=0)],
                     stop_grace_s=60)
    sup.start()
    pids = [c.proc.pid for c in sup.children if c.proc is not None]
    until(lambda: all(Path(f"/proc/{p}/status").exists() for p in pids))
    sup.stop()
    assert order.read_text().split() == ["worker-ended", "server-told"]
    assert sup.stop_timeout_s() == 120
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"{pid} outlived the stop")
