"""The jobs file: its syntax, errors with line numbers, and re-reads that submit each
line once (real database and Redis)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app.core.errors import JobsFileError
from app.ops import submit as submit_ops
from app.ops.registry import call_local
from scheduler.jobsfile import JobsFileWatcher, parse_line
from tests.support.servers import server_env, until


def test_a_line_with_options_becomes_a_job_spec():
    spec = parse_line("gpus=2 priority=5 name='sweep a' env.LR=3e-4 gpu_ids=0,3 after=4,9 "
                      "-- python train.py --lr 3e-4", 1)
    assert spec == {"command": "python train.py --lr 3e-4", "gpus": 2, "priority": 5,
                    "name": "sweep a", "env": {"LR": "3e-4"}, "allowed_gpu_ids": [0, 3],
                    "after": [4, 9]}


def test_a_plain_line_is_the_command_and_comments_are_skipped():
    line = "python eval.py --split test"
    assert parse_line(line, 1) == {"command": line}
    assert parse_line("  # a comment", 2) is None
    assert parse_line("   ", 3) is None


@pytest.mark.parametrize(("line", "message"), [
    ("gpus=two -- python a.py", "line 7: gpus takes an integer, got 'two'"),
    ("colour=red -- python a.py", "line 7: unknown option 'colour'; known:"),
    ("gpus -- python a.py", "line 7: options are key=value"),
    ("gpus=1 --   ", "line 7: invalid job: command"),
    ("gpus=-1 -- python a.py", "line 7: invalid job: gpus"),
    ("name='open -- python a.py", "line 7: cannot read the options"),
])
def test_malformed_lines_are_reported_with_their_number(line, message):
    with pytest.raises(JobsFileError, match=message):
        parse_line(line, 7)


def _submit_many(local):
    return lambda origin, specs, **more: local.call("submit_many", origin=origin, specs=specs,
                                                   **more)


def test_rereads_submit_only_new_lines_and_skip_bad_ones(local, tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_text("# sweep\ngpus=1 name=a -- python train.py --lr 1\nbogus=1 -- x\n")
    watcher = JobsFileWatcher(path, _submit_many(local))
    first = watcher.poll()
    assert first is not None and len(first.submitted) == 1
    assert first.errors == ["line 3: unknown option 'bogus'; known: after, backend, conda_env, "
                            "env.KEY, gpu_ids, gpus, max_restarts, name, preflight, priority, "
                            "project, recover_on_exit_codes, signal, time, tmux, venv, "
                            "workdir; the line: bogus=1 -- x"]
    assert watcher.poll() is None, "unchanged file: not read again"

    with path.open("a") as f:
        f.write("gpus=2 name=b -- python train.py --lr 2\n")
    second = watcher.poll()
    assert second is not None and len(second.submitted) == 1 and second.known == 1
    rows = local.call("queue", limit=10)["jobs"]
    assert sorted((r["name"], r["gpus"]) for r in rows) == [("a", 1), ("b", 2)]


def test_a_restarted_watcher_submits_nothing_twice_even_after_jobs_ended(local, tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_text("python a.py\npython b.py\n")
    assert len(JobsFileWatcher(path, _submit_many(local)).poll().submitted) == 2
    local.call("cancel", all_jobs=True)  # the jobs ended; the lines stay in the file
    fresh = JobsFileWatcher(path, _submit_many(local))
    again = fresh.poll()
    assert again is not None and again.submitted == [] and again.known == 2
    assert local.call("queue")["total"] == 2


def test_the_watcher_memory_is_bounded(local, tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_text("".join(f"python shard.py {n}\n" for n in range(50)))
    watcher = JobsFileWatcher(path, _submit_many(local), remember=10)
    assert len(watcher.poll().submitted) == 50
    assert len(watcher._seen) == 10
    os.utime(path, ns=(1, 1))  # touched: read again; the database still knows every line
    assert watcher.poll().submitted == []
    assert local.call("queue")["total"] == 50


# -- bad lines, edits, half-written saves ------------------------------------------------

def _names(local):
    return sorted((r["name"], r["priority"], r["status"])
                  for r in local.call("queue", limit=100)["jobs"])


def test_a_line_the_server_refuses_is_named_and_the_other_lines_go_in(local, tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_text("name=a -- python a.py\n"
                    "name=b preflight=no-such-check -- python b.py\n"
                    "name=c after=424242 -- python c.py\n"
                    "name=d -- python d.py\n")
    result = JobsFileWatcher(path, _submit_many(local)).poll()
    assert len(result.submitted) == 2
    assert [e.split(";")[0] for e in result.errors] == [
        "line 2: unknown preflight 'no-such-check'",
        "line 3: --after names no such job: 424242"]
    assert result.errors[0].endswith(
        "the line: name=b preflight=no-such-check -- python b.py")
    assert "choose one of" in result.errors[0]
    assert result.errors[1].endswith("the line: name=c after=424242 -- python c.py")
    assert [n for n, *_ in _names(local)] == ["a", "d"]


def test_lines_that_differ_only_in_their_name_are_two_jobs(local, tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_text("name=seed-a -- python train.py\nname=seed-b -- python train.py\n")
    assert len(JobsFileWatcher(path, _submit_many(local)).poll().submitted) == 2
    assert [n for n, *_ in _names(local)] == ["seed-a", "seed-b"]


def test_a_priority_edit_applies_to_a_pending_job_and_is_reported_otherwise(local, tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_text("name=a priority=1 -- python a.py\nname=b priority=1 -- python b.py\n")
    watcher = JobsFileWatcher(path, _submit_many(local))
    a, b = watcher.poll().submitted
    local.call("cancel", ids=[b])  # b ended: an edit can no longer change it
    path.write_text("name=a priority=7 -- python a.py\nname=b priority=7 -- python b.py\n")
    edited = watcher.poll()
    assert edited.submitted == [] and edited.errors == [] and edited.known == 2
    assert edited.notes == [
        f"line 1: job {a}: priority 1 -> 7",
        f"line 2: job {b} is already CANCELLED: the new priority 7 is not applied (a priority "
        "edit applies only while the job is PENDING)"]
    assert _names(local) == [("a", 7, "PENDING"), ("b", 1, "CANCELLED")]


def test_a_renamed_line_is_a_new_job(local, tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_text("name=old -- python a.py\n")
    watcher = JobsFileWatcher(path, _submit_many(local))
    assert len(watcher.poll().submitted) == 1
    path.write_text("name=new -- python a.py\n")
    assert len(watcher.poll().submitted) == 1
    assert [n for n, *_ in _names(local)] == ["new", "old"]


def test_invalid_utf8_is_reported_by_line_and_the_watcher_keeps_going(local, tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_bytes(b"python a.py\npython caf\xc3\n")  # a save cut inside a character
    watcher = JobsFileWatcher(path, _submit_many(local))
    first = watcher.poll()
    assert len(first.submitted) == 1
    assert first.errors == ["line 2: byte 11 is not UTF-8 (bytes from a save in progress, or "
                            "another encoding); save the file as UTF-8"]
    path.write_text("python a.py\npython caf\u00e9\n")  # the save completed
    second = watcher.poll()
    assert len(second.submitted) == 1 and second.errors == [] and second.known == 1


def test_a_last_line_without_its_newline_waits_until_the_file_is_stable(local, tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_text("python a.py\npython train.py --epo")  # a save in progress
    watcher = JobsFileWatcher(path, _submit_many(local))
    assert len(watcher.poll().submitted) == 1
    with path.open("a") as f:
        f.write("chs 10\n")
    assert len(watcher.poll().submitted) == 1
    assert sorted(r["command"] for r in local.call("queue")["jobs"]) == [
        "python a.py", "python train.py --epochs 10"]

    with path.open("a") as f:
        f.write("python last.py")  # an editor that writes no final newline
    assert watcher.poll().submitted == []
    stable = watcher.poll()  # unchanged since: the line is whole
    assert stable is not None and len(stable.submitted) == 1
    assert watcher.poll() is None


def _gpuq(settings, *args):
    return subprocess.run([str(Path(sys.executable).parent / "gpuq"), *args],
                          env=server_env(settings), capture_output=True, text=True,
                          timeout=120)


def test_watch_once_refuses_a_missing_file_or_a_directory(settings, tmp_path):
    missing = _gpuq(settings, "watch", str(tmp_path / "missing.txt"), "--once")
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines() == [
        f"error: no jobs file {tmp_path / 'missing.txt'}; create it (one job per line) and "
        "run again"]
    folder = _gpuq(settings, "watch", str(tmp_path), "--once")
    assert folder.returncode != 0 and "is a directory" in folder.stderr
    assert "Traceback" not in missing.stderr + folder.stderr


def test_watch_once_submits_the_good_lines_and_exits_1_naming_the_bad(settings, tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_bytes(b"python a.py\npython b\xff.py\npreflight=nope -- python c.py\n"
                     b"python d.py")
    run = _gpuq(settings, "watch", str(path), "--once", "--interval", "0.2")
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    errors = run.stderr.strip().splitlines()
    assert len(errors) == 2 and "line 2: byte 9 is not UTF-8" in errors[0]
    assert "line 3: unknown preflight 'nope'" in errors[1]
    # a.py at once, then d.py once the file stayed the same
    assert [line.split()[0] for line in run.stdout.splitlines()] == ["submitted", "submitted"]


# -- big files: bounded transactions -------------------------------------------------------

def _origin_count(rt, origin: str, distinct: bool = False) -> int:
    from sqlalchemy import func, select

    from app.store.models import Job

    counted = func.count(Job.command.distinct()) if distinct else func.count()
    with rt.session() as session:
        return session.scalar(select(counted).where(Job.origin == origin)) or 0


def test_another_writer_gets_the_database_while_a_big_file_is_stored(local, rt, tmp_path,
                                                                     monkeypatch):
    # Given a big jobs file stored in many transactions (small ones here, to keep it short)
    monkeypatch.setattr(submit_ops, "FILE_LINES_PER_TRANSACTION", 50)
    origin = str(tmp_path / "big.txt")
    specs = [{"command": f"python shard.py {n}", "gpus": 0} for n in range(2_000)]
    answer: dict = {}
    importer = threading.Thread(target=lambda: answer.update(
        local.call("submit_many", origin=origin, specs=specs)))
    importer.start()
    try:
        # When another writer submits a job while the import is under way
        until(lambda: _origin_count(rt, origin) > 0, timeout_s=60, poll_s=0.01)
        other = call_local(rt, "submit", {"spec": {"command": "echo meanwhile"}})["job_ids"][0]
    finally:
        importer.join(timeout=120)
    # Then its transaction went in between two of the import's, not after the last one
    imported = answer["submitted"]
    assert len(imported) == 2_000 and len(set(imported)) == 2_000
    assert min(imported) < other < max(imported)
    assert _origin_count(rt, origin) == 2_000


def test_a_file_import_killed_midway_and_run_again_stores_each_line_once(settings, rt,
                                                                         tmp_path):
    path = tmp_path / "big.txt"
    lines = 6_000
    path.write_text("".join(f"gpus=0 -- python shard.py {n}\n" for n in range(lines)))
    gpuq = str(Path(sys.executable).parent / "gpuq")
    first = subprocess.Popen([gpuq, "watch", str(path), "--once"], env=server_env(settings),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        until(lambda: _origin_count(rt, str(path)) > 0, timeout_s=90, poll_s=0.01)
    finally:
        first.kill()  # SIGKILL, mid-import
        first.wait()
    assert _origin_count(rt, str(path)) < lines, "killed after the import ended"
    again = _gpuq(settings, "watch", str(path), "--once")
    assert again.returncode == 0, again.stderr
    assert _origin_count(rt, str(path)) == lines
    assert _origin_count(rt, str(path), distinct=True) == lines  # each line once


# -- lines outlive their jobs; a line that leaves the file is forgotten ---------------------

DAY = 86400.0


def _prune_everything_ended(rt) -> int:
    """Retention as beat runs it, with every job that ended counted as 40 days old."""
    import time

    from sqlalchemy import update

    from app.store.models import Job
    from app.store.retention import prune_finished

    with rt.session() as session:
        session.execute(update(Job).where(Job.ended_at.is_not(None))
                        .values(ended_at=time.time() - 40 * DAY))
    return prune_finished(rt.engine, rt.redis, time.time() - 30 * DAY).jobs


def test_a_line_whose_job_retention_pruned_is_not_submitted_again(local, rt, tmp_path):
    # Given a line submitted, its job ended long ago and pruned by retention
    path = tmp_path / "jobs.txt"
    path.write_text("name=sweep -- python sweep.py\n")
    (job,) = JobsFileWatcher(path, _submit_many(local)).poll().submitted
    local.call("cancel", ids=[job])
    assert _prune_everything_ended(rt) == 1
    assert local.call("queue")["total"] == 0
    # When the file is read again, by a watcher that remembers nothing
    again = JobsFileWatcher(path, _submit_many(local)).poll()
    # Then nothing is submitted: the line is known
    assert again.submitted == [] and again.known == 1 and again.errors == []
    assert local.call("queue")["total"] == 0
    # And an edited priority on it is nothing to apply either
    path.write_text("name=sweep priority=5 -- python sweep.py\n")
    edited = JobsFileWatcher(path, _submit_many(local)).poll()
    assert edited.submitted == [] and edited.known == 1 and edited.notes == []


def test_a_line_removed_from_the_file_and_put_back_is_submitted_again(local, tmp_path):
    # Given two lines submitted
    path = tmp_path / "jobs.txt"
    path.write_text("python a.py\npython b.py\n")
    watcher = JobsFileWatcher(path, _submit_many(local))
    assert len(watcher.poll().submitted) == 2
    # When b leaves the file, and the file stays so for a poll
    path.write_text("python a.py\n")
    assert watcher.poll().submitted == []
    assert not watcher.settled
    forgotten = watcher.poll()
    assert forgotten is not None and forgotten.forgotten == 1 and watcher.settled
    assert watcher.poll() is None
    # Then b put back is a new line: submitted again; a is still known
    path.write_text("python a.py\npython b.py\n")
    back = watcher.poll()
    assert len(back.submitted) == 1 and back.known == 1
    assert sorted(r["command"] for r in local.call("queue")["jobs"]) == [
        "python a.py", "python b.py", "python b.py"]
    # And a watcher started afresh forgets what left the file while none was watching
    path.write_text("python b.py\n")
    fresh = JobsFileWatcher(path, _submit_many(local))
    assert fresh.poll().known == 1 and not fresh.settled
    assert fresh.poll().forgotten == 1
    path.write_text("python b.py\npython a.py\n")
    assert len(fresh.poll().submitted) == 1


def test_a_line_missing_from_a_file_that_is_still_changing_is_not_forgotten(local, tmp_path):
    # Given a line submitted
    path = tmp_path / "jobs.txt"
    path.write_text("python a.py\npython b.py\n")
    watcher = JobsFileWatcher(path, _submit_many(local))
    assert len(watcher.poll().submitted) == 2
    # When a save in progress shows the file without b, then whole again before it settled
    path.write_text("python a.py\n")
    watcher.poll()
    path.write_text("python a.py\npython b.py\n")
    whole = watcher.poll()
    # Then b was never forgotten: nothing runs again
    assert whole.submitted == [] and watcher.settled
    assert watcher.poll() is None
    assert local.call("queue")["total"] == 2


def test_a_submitter_cannot_set_the_origin_of_a_job(rt, local, settings):
    from fastapi.testclient import TestClient

    from app.core.errors import InvalidJobSpec
    from app.core.identity import Actor
    from app.dashboard import create_app
    from tests.support.dashboard_http import BASE_URL

    # Given the stack owner's jobs file with a line not yet read by its watcher
    path = settings.home / "jobs.txt"
    settings.home.mkdir(parents=True, exist_ok=True)
    path.write_text("name=eval -- python eval.py\n")
    bob = Actor("bob")
    claim = {"command": "python eval.py", "name": "eval", "origin": str(path.resolve())}
    # When a named user, the owner and the API's caller try to give a job that origin
    for actor in (bob, None):
        with pytest.raises(InvalidJobSpec, match="origin"):
            call_local(rt, "submit", {"spec": claim}, actor)
        with pytest.raises(InvalidJobSpec, match="origin"):
            call_local(rt, "launch", {"spec": claim, "num_jobs": 1}, actor)
    app = create_app(settings.model_copy(update={"dashboard_token": "owner-t"}), local)
    with TestClient(app, base_url=BASE_URL,
                    headers={"Authorization": "Bearer owner-t"}) as http:
        assert http.post("/api/jobs", json={**claim}).status_code == 422
        refused = http.post("/api/ops/submit", json={"spec": claim})
        assert refused.status_code in (400, 422), refused.text
    with pytest.raises(InvalidJobSpec, match="origin"):
        local.submit("python eval.py", name="eval", origin=str(path))
    # Then nothing was stored, and the line is the file's own when its watcher reads it
    assert local.call("queue")["total"] == 0
    assert len(JobsFileWatcher(path, _submit_many(local)).poll().submitted) == 1


def test_watch_says_how_many_jobs_a_big_file_submitted_not_every_id(settings, tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_text("".join(f"gpus=0 -- python shard.py {n}\n" for n in range(300)))
    run = _gpuq(settings, "watch", str(path), "--once")
    assert run.returncode == 0, run.stderr
    [line] = run.stdout.splitlines()
    assert line.startswith("submitted 300 jobs: ids ") and len(line) < 80, line
    path.write_text(path.read_text() + "gpus=0 -- python shard.py last\n")
    again = _gpuq(settings, "watch", str(path), "--once")
    assert again.stdout.startswith("submitted 1 job: "), again.stdout


def test_a_line_another_watcher_forgot_is_submitted_again_when_put_back(local, tmp_path):
    # Given two watchers of one file (`gpuq up --jobs-file` and `gpuq watch`)
    path = tmp_path / "jobs.txt"
    path.write_text("python a.py\npython b.py\n")
    first, second = (JobsFileWatcher(path, _submit_many(local)) for _ in range(2))
    assert len(first.poll().submitted) == 2 and second.poll().known == 2
    # When b leaves the file and the first forgets it before the second reads the file
    path.write_text("python a.py\n")
    first.poll()
    assert first.poll().forgotten == 1
    second.poll()
    # Then b put back is submitted once, by whichever watcher reads it first
    path.write_text("python a.py\npython b.py\n")
    assert len(second.poll().submitted) == 1
    assert first.poll().submitted == []
    assert local.call("queue")["total"] == 3
