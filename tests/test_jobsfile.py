"""The jobs file: its syntax, errors with line numbers, and re-reads that submit each
line once (real database and Redis)."""

from __future__ import annotations

import os

import pytest

from app.core.errors import JobsFileError
from scheduler.jobsfile import JobsFileWatcher, parse_line


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
    return lambda origin, specs: local.call("submit_many", origin=origin, specs=specs)


def test_rereads_submit_only_new_lines_and_skip_bad_ones(local, tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_text("# sweep\ngpus=1 name=a -- python train.py --lr 1\nbogus=1 -- x\n")
    watcher = JobsFileWatcher(path, _submit_many(local))
    first = watcher.poll()
    assert first is not None and len(first.submitted) == 1
    assert first.errors == ["line 3: unknown option 'bogus'; known: after, backend, conda_env, "
                            "env.KEY, gpu_ids, gpus, max_restarts, name, preflight, priority, "
                            "recover_on_exit_codes, tmux, venv, workdir"]
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
