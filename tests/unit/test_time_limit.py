"""An attempt's time limit on its worker: counted from its recorded start, moved by a
renewal that reads a new limit, and its warning signal sent once before it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from app.client import JobEnvironment
from app.store.models import Job
from scheduler.worker.executor import TIMEOUT, grace_for, job_environment
from scheduler.worker.timelimit import TimeLimit


def test_the_limit_counts_from_the_recorded_start_and_none_before_it():
    limit = TimeLimit(1, 60, None)
    assert limit.deadline is None and not limit.reached(now=10**10)
    limit.began(pgid=123, started_at=1000.0)
    assert limit.deadline == 1060.0
    assert not limit.reached(now=1059.9)
    assert limit.reached(now=1060.0)


def test_a_renewal_moves_the_limit_but_a_start_read_while_starting_is_the_attempt_before():
    limit = TimeLimit(1, 60, None)
    limit.reread("STARTING", 500.0, 30)  # the row still holds attempt 1's start
    assert limit.deadline is None and limit.time_limit_s == 30
    limit.began(pgid=123, started_at=1000.0)
    limit.reread("RUNNING", 1000.0, 10)  # `gpuq update --time 10s`
    assert limit.deadline == 1010.0
    limit.reread("RUNNING", 1000.0, None)
    assert limit.deadline is None


def test_the_signal_is_due_its_lead_before_the_limit_and_only_once():
    limit = TimeLimit(1, 60, "USR2@20")
    limit.began(pgid=123, started_at=1000.0)
    assert limit.signal_due(now=1039.9) is None
    assert limit.signal_due(now=1040.0) == signal.SIGUSR2
    limit.signalled = True
    assert limit.signal_due(now=1050.0) is None


def test_a_lead_longer_than_the_limit_signals_at_the_start():
    limit = TimeLimit(1, 5, "USR1@90")
    limit.began(pgid=123, started_at=1000.0)
    assert limit.signal_due(now=1000.0) == signal.SIGUSR1


def test_the_keeper_sends_the_signal_to_the_whole_group_once(tmp_path: Path):
    # Given a process group whose leader counts the USR2 it gets
    script = ("import signal, sys, time\n"
              "n = []\n"
              "signal.signal(signal.SIGUSR2, lambda *a: (n.append(1), print(len(n), flush=True)))\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            start_new_session=True, text=True)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"  # its handler is set
        limit = TimeLimit(1, 3600, "USR2@3600")  # due at once
        limit.began(pgid=proc.pid, started_at=time.time())
        done = threading.Event()
        keeper = threading.Thread(target=limit.keep, args=(done,))
        keeper.start()
        assert proc.stdout.readline().strip() == "1"
        time.sleep(0.5)  # ticks pass without a second one
        done.set()
        keeper.join()
        assert limit.signalled
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rest = proc.stdout.read()
        proc.stdout.close()
    assert rest == ""


def test_a_job_at_its_limit_gets_the_kill_wait_and_any_other_stop_the_kill_grace():
    assert grace_for(TIMEOUT, 10, 30) == 30
    assert grace_for("cancel", 10, 30) == 10
    assert grace_for(TIMEOUT, 10, None) == 10


def test_the_job_reads_its_deadline_and_what_is_left():
    job = Job(id=4, command="true", time_limit_s=90)
    seen = JobEnvironment.from_env(job_environment(job, {}, [0], "box", now=1000.0))
    assert seen.deadline == 1090
    assert seen.remaining_s(now=1030.0) == 60
    assert seen.remaining_s(now=2000.0) == 0
    unlimited = JobEnvironment.from_env(job_environment(Job(id=5, command="true"), {}, [],
                                                        "box"))
    assert unlimited.deadline is None and unlimited.remaining_s() is None
