"""Time limits at submission and after it: a user's or project's max_time refuses a longer
job with nothing stored, default_time gives one to jobs that ask for none, and `gpuq update
--time` lets a user shorten their own jobs' limits while only an admin lengthens one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import func, select
from typer.testing import CliRunner

from app.cli.main import cli
from app.client import Client
from app.core.errors import InvalidArguments, NotPermitted, OverLimit
from app.core.identity import Actor
from app.ops.registry import call_local
from app.runtime import Runtime
from app.store import limits
from app.store.models import Job, JobEvent

ALICE, BOB, ADMIN = Actor("alice"), Actor("bob"), Actor("root", admin=True)


def _limit(rt: Runtime, kind: str, name: str, **values: object) -> None:
    call_local(rt, "set_limits", {"kind": kind, "name": name, "values": values})


def _submit(rt: Runtime, actor: Actor, command: str, **spec: object) -> int:
    out = call_local(rt, "submit", {"spec": {"command": command, "gpus": 0, **spec}}, actor)
    return int(out["job_ids"][0])


def _limit_of(rt: Runtime, job_id: int) -> int | None:
    with rt.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.time_limit_s


def _stored(rt: Runtime) -> tuple[int, int]:
    with rt.session() as session:
        return (session.scalar(select(func.count()).select_from(Job)) or 0,
                session.scalar(select(func.count()).select_from(JobEvent)) or 0)


# -- max_time and default_time -----------------------------------------------------------


def test_a_job_over_max_time_is_refused_naming_the_limit_and_nothing_is_stored(rt):
    _limit(rt, "user", "alice", max_time_s=7200)
    _submit(rt, ALICE, "true # within", time_limit_s="2h")
    before = _stored(rt)
    with pytest.raises(OverLimit) as refused:
        _submit(rt, ALICE, "true # over", time_limit_s="3h")
    assert str(refused.value) == (
        "user alice's jobs may run at most 2h (max_time) and this one asks for 3h: submit "
        "with --time 2h or less, or ask an admin to raise it (gpuq limits set --user alice "
        "--max-time T)")
    with pytest.raises(OverLimit, match="max_time"):
        call_local(rt, "launch", {"spec": {"command": "true # over {rank}", "gpus": 0,
                                           "time_limit_s": "1d"}, "num_jobs": 3}, ALICE)
    assert _stored(rt) == before
    # Another user is not held by alice's limit
    assert _limit_of(rt, _submit(rt, BOB, "true # bob's", time_limit_s="1d")) == 86400


def test_a_project_max_time_holds_for_every_member(rt):
    _limit(rt, "project", "*", max_time_s=3600)
    with pytest.raises(OverLimit, match="project alice's jobs may run at most 1h"):
        _submit(rt, ALICE, "true", time_limit_s="90m")


def test_default_time_is_the_limit_of_a_job_that_gives_none(rt):
    _limit(rt, "user", "alice", default_time_s=4 * 3600, max_time_s=2 * 86400)
    _limit(rt, "project", "*", default_time_s=600)
    assert _limit_of(rt, _submit(rt, ALICE, "true # default")) == 4 * 3600
    assert _limit_of(rt, _submit(rt, ALICE, "true # asked", time_limit_s="1d")) == 86400
    assert _limit_of(rt, _submit(rt, BOB, "true # project's default")) == 600


def test_under_max_time_alone_a_job_that_gives_none_gets_max_time_as_slurm_does(rt):
    _limit(rt, "user", "*", max_time_s=86400)
    assert _limit_of(rt, _submit(rt, ALICE, "true")) == 86400


def test_no_limit_anywhere_means_no_time_limit(rt):
    assert _limit_of(rt, _submit(rt, ALICE, "true")) is None


def test_the_limits_file_takes_durations(rt, local: Client):
    path = Path(rt.settings.home) / "limits.toml"
    path.write_text('[user.alice]\nmax_time = "2d"\ndefault_time = "4h"\n')
    with rt.session() as session:
        entry = limits.read(session, rt.settings).of("user", "alice")
    assert (entry.max_time_s, entry.default_time_s) == (2 * 86400, 4 * 3600)
    table = {(e["kind"], e["name"]): e for e in local.call("limits_table")["entries"]}
    assert table[("user", "alice")]["max_time_s"] == 2 * 86400
    path.write_text('[user.alice]\nmax_time = 90\n')
    with pytest.raises(InvalidArguments, match='max_time takes a duration in quotes'):
        local.call("limits_table")
    path.write_text('[user.alice]\nmax_time = "90"\n')
    with pytest.raises(InvalidArguments, match="max_time takes a unit or a clock"):
        local.call("limits_table")


def test_gpuq_limits_set_takes_durations_and_shows_them(settings, monkeypatch, rt):
    for key, value in settings.as_environment().items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    out = runner.invoke(cli, ["limits", "set", "--user", "alice", "--max-time", "2d",
                              "--default-time", "4h"])
    assert out.exit_code == 0, out.output
    assert "max_time=2d, default_time=4h" in out.output
    listed = runner.invoke(cli, ["limits", "--json"])
    entry = next(e for e in json.loads(listed.output)["entries"] if e["name"] == "alice")
    assert (entry["max_time_s"], entry["default_time_s"]) == (2 * 86400, 4 * 3600)
    assert "user alice: time limit 4h/2d (default/max)" in runner.invoke(cli, ["limits"]).output
    bad = runner.invoke(cli, ["limits", "set", "--user", "alice", "--max-time", "48"])
    assert bad.exit_code != 0 and "--max-time takes a unit or a clock" in bad.output


# -- gpuq update --time ------------------------------------------------------------------


def test_a_user_shortens_their_own_jobs_limit(rt):
    job = _submit(rt, ALICE, "sleep 1", time_limit_s="2h")
    unlimited = _submit(rt, ALICE, "sleep 2")
    out = call_local(rt, "update", {"ids": [job, unlimited], "time": "30m"}, ALICE)
    assert out == {"updated": [job, unlimited], "time_limit_s": 1800}
    assert _limit_of(rt, job) == _limit_of(rt, unlimited) == 1800
    with rt.session() as session:
        said = session.exec(select(JobEvent.reason).where(JobEvent.job_id == job)).all()
    assert "time limit set to 30m by alice" in said


def test_a_user_may_not_lengthen_a_limit_and_nothing_changes(rt):
    short = _submit(rt, ALICE, "sleep 1", time_limit_s="1h")
    other = _submit(rt, ALICE, "sleep 2", time_limit_s="3h")
    for asked in ("2h", "none"):
        with pytest.raises(NotPermitted) as refused:
            call_local(rt, "update", {"ids": [other, short], "time": asked}, ALICE)
        assert str(refused.value).startswith(
            f"job {short}'s time limit is 1h: you (alice) may shorten it, and only an admin "
            "may lengthen it")
    assert (_limit_of(rt, short), _limit_of(rt, other)) == (3600, 3 * 3600)


def test_an_admin_lengthens_a_limit_or_takes_it_away(rt):
    job = _submit(rt, ALICE, "sleep 1", time_limit_s="1h")
    call_local(rt, "update", {"ids": [job], "time": "1d"}, ADMIN)
    assert _limit_of(rt, job) == 86400
    call_local(rt, "update", {"ids": [job], "time": "none"}, ADMIN)
    assert _limit_of(rt, job) is None


def test_a_user_may_not_update_another_users_job(rt):
    job = _submit(rt, BOB, "sleep 1", time_limit_s="1h")
    with pytest.raises(NotPermitted, match="belongs to another user"):
        call_local(rt, "update", {"ids": [job], "time": "10m"}, ALICE)
    assert _limit_of(rt, job) == 3600


def test_update_reaches_every_job_of_a_launch_and_leaves_ended_ones(rt):
    out = call_local(rt, "launch", {"spec": {"command": "sleep {rank}", "gpus": 0},
                                    "num_jobs": 2}, ALICE)
    first, second = out["job_ids"]
    call_local(rt, "cancel", {"ids": [second]}, ALICE)
    updated = call_local(rt, "update", {"launch_id": out["launch_id"], "time": "5m"}, ALICE)
    assert updated["updated"] == [first] and updated["ended"] == {str(second): "CANCELLED"}
    assert (_limit_of(rt, first), _limit_of(rt, second)) == (300, None)


def test_update_refuses_bad_text_naming_the_forms(rt):
    job = _submit(rt, ALICE, "sleep 1")
    with pytest.raises(InvalidArguments, match="--time takes a unit or a clock: write 5m"):
        call_local(rt, "update", {"ids": [job], "time": "5"}, ALICE)
    with pytest.raises(InvalidArguments, match="say what to change: --time"):
        call_local(rt, "update", {"ids": [job]}, ALICE)


# -- batch backends ----------------------------------------------------------------------


def test_the_process_backend_stops_a_job_at_its_limit_and_calls_it_timeout(rt, local):
    from adapters.process import ProcessAdapter
    from tests.contract.test_adapters import drive

    adapter = ProcessAdapter()
    adapter.rt = rt.__class__(rt.settings.model_copy(update={"kill_wait_s": 1.0}))
    try:
        over = local.submit("trap '' TERM; sleep 300", backend="process", time="2s",
                            max_restarts=2)
        within = local.submit("echo fine", backend="process", time="1h")
        rows = {r["id"]: r for r in drive(adapter, local, [over.id, within.id])}
    finally:
        adapter.rt.close()
    assert rows[over.id]["status"] == "TIMEOUT", rows[over.id]
    assert rows[over.id]["reason"] == "reached its time limit of 2s"
    assert rows[over.id]["restart_count"] == 0
    assert rows[within.id]["status"] == "SUCCEEDED"


def test_slurm_is_given_each_jobs_limit_over_the_stacks_and_its_timeout_is_ours(rt, monkeypatch):
    from adapters.intent import Submission
    from adapters.slurm import SlurmAdapter, _status

    adapter = SlurmAdapter()
    adapter.rt = rt.__class__(rt.settings.model_copy(update={"slurm_time_limit": "1:00:00"}))
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(adapter, "_run", lambda *args, **kw: calls.append(args) or "7\n")
    try:
        for limit in (5400, None):
            adapter.submit(Submission(jobs=[Job(id=3, command="true", time_limit_s=limit)],
                                      env={}, gpus=0, name="x", tag="gpuq-t-3-1-1"))
    finally:
        adapter.rt.close()
    assert "--time=0-01:30:00" in calls[0] and "--time=1:00:00" not in calls[0]
    assert "--time=1:00:00" in calls[1]
    assert _status("TIMEOUT", "TimeLimit", "0:15").state == "timeout"


def test_gpuq_update_sets_a_limit_and_exits_1_for_a_job_already_ended(settings, monkeypatch,
                                                                      rt):
    for key, value in settings.as_environment().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GPUQ_TRANSPORT", "local")
    waiting = _submit(rt, ADMIN, "sleep 1", time_limit_s="1h")
    ended = _submit(rt, ADMIN, "sleep 2")
    call_local(rt, "cancel", {"ids": [ended]})
    runner = CliRunner()
    out = runner.invoke(cli, ["update", str(waiting), "--time", "1:30:00"])
    assert out.exit_code == 0, out.output
    assert "updated 1: time limit 90m" in out.output
    assert _limit_of(rt, waiting) == 5400
    both = runner.invoke(cli, ["update", str(waiting), str(ended), "--time", "2h"])
    assert both.exit_code == 1
    assert f"job {ended} already CANCELLED; nothing to update" in both.output


def test_slurm_sends_a_jobs_warning_signal_to_its_runner(rt, monkeypatch):
    from adapters.intent import Submission
    from adapters.slurm import SlurmAdapter

    adapter = SlurmAdapter()
    adapter.rt = rt
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(adapter, "_run", lambda *args, **kw: calls.append(args) or "7\n")
    for limit, signal in ((5400, "USR2@90"), (None, "USR2@90"), (5400, None)):
        adapter.submit(Submission(jobs=[Job(id=3, command="true", time_limit_s=limit,
                                            signal=signal)],
                                  env={}, gpus=0, name="x", tag="gpuq-t-3-1-1"))
    # to the batch shell (B:), which is the runner, which passes it on to the job's group
    assert "--signal=B:USR2@90" in calls[0]
    assert not any(a.startswith("--signal") for a in (*calls[1], *calls[2])), \
        "no limit, or no signal asked for: none sent"
