"""While a job's start is being recorded, the job is watched as it is once it runs: a record
that hangs (the database away) does not keep it from being stopped."""

from __future__ import annotations

import os
import threading
import time

import pytest

from app.core.procgroup import group_exists
from app.store.models import Job
from scheduler.worker import executor


def test_a_start_record_that_hangs_does_not_keep_the_job_from_being_stopped(tmp_path):
    database_back = threading.Event()
    started: list[int] = []

    def on_start(pid: int) -> bool:  # the RUNNING write, waiting on a database that is away
        started.append(pid)
        database_back.wait(60)
        return True

    lease_gone = threading.Event()
    try:
        threading.Timer(0.5, lease_gone.set).start()
        outcome = executor.run(
            Job(command="sleep 60"), "sleep 60", dict(os.environ), tmp_path / "log",
            grace_s=1, should_stop=lambda: executor.LEASE if lease_gone.is_set() else None,
            on_start=on_start)
        assert outcome.stopped == executor.LEASE
        assert not group_exists(started[0]), "the job's process group is gone"
        assert not database_back.is_set(), "stopped while the record still waited"
    finally:
        database_back.set()


def test_a_start_the_record_finds_unwanted_is_stopped_at_once_as_superseded(tmp_path):
    began = time.monotonic()
    outcome = executor.run(Job(command="sleep 60"), "sleep 60", dict(os.environ),
                           tmp_path / "log", grace_s=30, should_stop=lambda: None,
                           on_start=lambda _pid: False)
    assert outcome.stopped == executor.SUPERSEDED
    assert time.monotonic() - began < 30, "not given the kill grace"


def test_a_record_that_fails_stops_the_job_and_says_why(tmp_path):
    started: list[int] = []

    def on_start(pid: int) -> bool:
        started.append(pid)
        raise RuntimeError("the record failed")

    with pytest.raises(RuntimeError, match="the record failed"):
        executor.run(Job(command="sleep 60"), "sleep 60", dict(os.environ), tmp_path / "log",
                     grace_s=1, should_stop=lambda: None, on_start=on_start)
    assert not group_exists(started[0])
