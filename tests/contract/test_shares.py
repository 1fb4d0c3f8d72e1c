"""A shared cluster without workers, on real Redis and a real database: limits per user and
project, fair share's order, and `gpuq why`, whose every reason is built here on purpose."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import insert
from sqlmodel import col, func, select
from typer.testing import CliRunner

from app.cli.main import cli
from app.client import Client
from app.core import keys
from app.core.errors import InvalidArguments, NotPermitted, OverLimit
from app.core.identity import Actor
from app.core.states import JobState
from app.ops.registry import call_local
from app.runtime import Runtime
from app.store import limits
from app.store.jobs import transition
from app.store.models import Job, JobEvent, Usage
from scheduler.dispatch.allocator import Dispatcher
from tests.contract.test_allocator import _bring_up, _foreign

ALICE, BOB, CAROL = Actor("alice"), Actor("bob"), Actor("carol")


def _as(local: Client, actor: Actor) -> Client:
    return local.acting_for(actor)


def _launch(rt: Runtime, actor: Actor, command: str, num_jobs: int) -> list[int]:
    """A launch stored without a payload (a named user's launches carry none)."""
    out = call_local(rt, "launch", {"spec": {"command": command}, "num_jobs": num_jobs}, actor)
    return list(out["job_ids"])


def _limit(rt: Runtime, kind: str, name: str, **values: object) -> None:
    call_local(rt, "set_limits", {"kind": kind, "name": name, "values": values})


def _members(rt: Runtime, project: str, *users: str) -> None:
    """An admin lets these users submit to the project."""
    call_local(rt, "project_members", {"name": project, "add": list(users)})


def _why(local: Client, job_id: int) -> tuple[str, str]:
    out = local.call("why", job_id=job_id)
    return out["code"], out["reason"]


def _used(rt: Runtime, user: str, gpu_hours: float) -> None:
    """Fair-share usage as if `user`'s attempts had used this many GPU-hours just now."""
    with rt.engine.begin() as conn:
        conn.execute(insert(Usage), [{"kind": "user", "name": user,
                                      "gpu_seconds": gpu_hours * 3600, "at": time.time()}])


def _starts(rt: Runtime) -> list[int]:
    """Jobs in the order the dispatcher started them."""
    with rt.session() as session:
        return list(session.exec(select(JobEvent.job_id).where(
            JobEvent.to_state == "STARTING").order_by(col(JobEvent.id))))


# -- limits ------------------------------------------------------------------------------


def test_a_user_at_the_gpu_limit_waits_while_gpus_are_free_and_says_why(rt, local):
    _bring_up(rt, "h", 4)
    _limit(rt, "user", "alice", max_gpus=2)
    jobs = [_as(local, ALICE).submit(f"sleep 100 # {i}") for i in range(4)]
    Dispatcher(rt).dispatch()
    assert [j.status for j in jobs] == ["STARTING", "STARTING", "PENDING", "PENDING"]
    code, reason = _why(local, jobs[2].id)
    assert code == "LIMIT" and "user alice runs 2/2 GPUs" in reason
    # Another user takes the GPUs alice may not
    other = _as(local, BOB).submit("sleep 100 # bob")
    assert other.status == "STARTING"
    # and the queue shows alice's jobs with the same reason
    rows = {r["id"]: r for r in local.call("queue", limit=10)["jobs"]}
    assert rows[jobs[3].id]["why"] == "LIMIT"


def test_a_project_limit_holds_across_its_users(rt, local):
    _bring_up(rt, "h", 4)
    _limit(rt, "project", "vision", max_gpus=1)
    _members(rt, "vision", "alice", "bob")
    _members(rt, "nlp", "bob")
    first = _as(local, ALICE).submit("sleep 100 # a", project="vision")
    second = _as(local, BOB).submit("sleep 100 # b", project="vision")
    elsewhere = _as(local, BOB).submit("sleep 100 # c", project="nlp")
    Dispatcher(rt).dispatch()
    assert (first.status, second.status, elsewhere.status) == ("STARTING", "PENDING", "STARTING")
    code, reason = _why(local, second.id)
    assert code == "LIMIT" and "project vision runs 1/1 GPUs" in reason


def test_a_submission_over_the_pending_limit_is_refused_naming_it_and_nothing_changes(
        rt, local):
    _limit(rt, "user", "alice", max_pending=5)
    _launch(rt, ALICE, "true # first", 4)
    with rt.session() as session:
        before = session.scalar(select(func.count()).select_from(Job))
    with pytest.raises(OverLimit, match=r"user alice may have 5 jobs pending \(max_pending\) "
                       r"and has 4; these 2 would make 6"):
        _launch(rt, ALICE, "true # second", 2)
    with pytest.raises(OverLimit, match="max_pending"):
        _launch(rt, ALICE, "true # third", 2)
    with rt.session() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == before
        assert session.scalar(select(func.count()).select_from(JobEvent)) == before
    # One more fits; another user is not held by alice's limit
    _as(local, ALICE).submit("true # the fifth")
    _launch(rt, BOB, "true # bob", 10)


def test_limits_come_from_a_file_and_the_database_wins_field_by_field(rt, local):
    path = Path(rt.settings.home) / "limits.toml"
    path.write_text('[user."*"]\nmax_gpus = 3\n\n[user.alice]\nmax_gpus = 1\nweight = 2\n'
                    'default_project = "vision"\n\n[project.vision]\nmax_pending = 100\n')
    _limit(rt, "user", "alice", max_gpus=2)
    with rt.session() as session:
        found = limits.read(session, rt.settings)
    assert found.of("user", "alice").max_gpus == 2  # the database's
    assert found.weight("user", "alice") == 2.0  # the file's
    assert found.of("user", "zed").max_gpus == 3  # everyone's
    assert found.project_of("alice") == "vision" and found.project_of("bob") == "bob"
    job = _as(local, ALICE).submit("true # in her default project")
    assert job.row()["project"] == "vision"
    table = {(e["kind"], e["name"]): e for e in local.call("limits_table")["entries"]}
    assert table[("user", "alice")]["max_gpus"] == 2
    assert table[("project", "vision")]["max_pending"] == 100
    assert table[("project", "vision")]["pending"] == 1


def test_a_named_users_plain_launch_carries_no_payload_and_is_theirs(rt, local):
    _members(rt, "vision", "alice")
    handle = _as(local, ALICE).launch("true # alice's sweep {rank}", num_jobs=3,
                                      project="vision")
    rows = local.rows(handle.job_ids)
    assert {(r["owner"], r["project"]) for r in rows} == {("alice", "vision")}
    with pytest.raises(NotPermitted, match="stored payload"):  # per-rank arguments need one
        _as(local, ALICE).launch("true", rank_args=[[1], [2]])


def test_a_bad_limits_file_or_value_is_refused_in_one_line(rt, local):
    with pytest.raises(InvalidArguments, match="max_gpus takes a whole number"):
        _limit(rt, "user", "alice", max_gpus=-1)
    with pytest.raises(InvalidArguments, match="weight takes a number above 0"):
        _limit(rt, "user", "alice", weight=0)
    with pytest.raises(InvalidArguments, match="unknown limit 'gpus'"):
        _limit(rt, "user", "alice", gpus=1)
    (Path(rt.settings.home) / "limits.toml").write_text("[users.alice]\nmax_gpus = 1\n")
    with pytest.raises(InvalidArguments, match=r"unknown table \[users\]"):
        local.call("limits_table")
    # A typo in the file stops no job: dispatch and submission leave the file out
    _bring_up(rt, "h", 1)
    assert _as(local, ALICE).submit("true # despite the typo").status == "STARTING"


def test_only_an_admin_sets_limits(rt, local):
    with pytest.raises(NotPermitted, match="an admin's to set"):
        _as(local, ALICE).call("set_limits", kind="user", name="alice",
                               values={"max_gpus": 100})
    _as(local, Actor("root", admin=True)).call("set_limits", kind="user", name="alice",
                                               values={"max_gpus": 100})


def test_gpuq_limits_sets_lists_and_clears(settings, monkeypatch, rt):
    for key, value in settings.as_environment().items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    out = runner.invoke(cli, ["limits", "set", "--user", "alice", "--max-gpus", "4",
                              "--max-pending", "20000", "--weight", "2"])
    assert out.exit_code == 0, out.output
    listed = runner.invoke(cli, ["limits", "--json"])
    entry = next(e for e in json.loads(listed.output)["entries"]
                 if e["name"] == "alice")
    assert (entry["max_gpus"], entry["max_pending"], entry["weight"]) == (4, 20000, 2.0)
    status = runner.invoke(cli, ["status"])
    assert status.exit_code == 0 and "alice" in status.output and "20000" in status.output
    assert runner.invoke(cli, ["limits", "set", "--user", "alice", "--max-gpus",
                               "none"]).exit_code == 0
    with rt.session() as session:
        assert limits.read(session, rt.settings).of("user", "alice").max_gpus is None
    assert "cleared" in runner.invoke(cli, ["limits", "clear", "--user", "alice"]).output
    both = runner.invoke(cli, ["limits", "set", "--user", "a", "--project", "b",
                               "--max-gpus", "1"])
    assert both.exit_code != 0 and "name one of --user NAME or --project NAME" in both.output


# -- fair share's order ------------------------------------------------------------------


def test_among_equal_priorities_the_user_who_used_less_goes_first(rt, local):
    _bring_up(rt, "h", 1)
    holder = _as(local, CAROL).submit("sleep 100 # holds the GPU")
    assert holder.status == "STARTING"
    _used(rt, "alice", 10.0)
    older = _as(local, ALICE).submit("true # alice, first in time")
    newer = _as(local, BOB).submit("true # bob, later")
    code, reason = _why(local, older.id)
    assert code == "FAIR_SHARE" and reason.startswith("behind user bob in fair share")
    assert _why(local, newer.id)[0] == "RESOURCES"
    # When the GPU frees, bob's starts first
    call_local(rt, "cancel", {"ids": [holder.id]})
    _end(rt, holder.id)
    Dispatcher(rt).dispatch()
    assert newer.status == "STARTING" and older.status == "PENDING"


def test_priority_still_goes_before_fair_share(rt, local):
    _bring_up(rt, "h", 1)
    _as(local, CAROL).submit("sleep 100 # holds the GPU")
    _used(rt, "alice", 10.0)
    _limit(rt, "user", "alice", max_priority=5)
    urgent = _as(local, ALICE).submit("true # urgent", priority=5)
    later = _as(local, BOB).submit("true # bob")
    assert _why(local, later.id) == ("PRIORITY", f"behind 1 job of higher priority (first: "
                                                 f"job {urgent.id})")


def test_in_one_pass_gpus_freed_together_are_shared_out(rt, local):
    _bring_up(rt, "h", 4)
    assert _all_freed_at_once(rt, jobs_each=8) == ["alice", "alice", "bob", "bob"]


def test_weight_doubles_a_users_share_of_the_gpus(rt, local):
    _bring_up(rt, "h", 6)
    _limit(rt, "user", "bob", weight=2)
    assert _all_freed_at_once(rt, jobs_each=12) == ["alice", "alice", "bob", "bob", "bob",
                                                    "bob"]


def _all_freed_at_once(rt: Runtime, jobs_each: int) -> list[str]:
    """alice's jobs, then bob's; alice's first took every GPU at submission. Free them all
    at once and run one pass: the owners of the jobs it starts."""
    _launch(rt, ALICE, "true # alice", jobs_each)
    _launch(rt, BOB, "true # bob", jobs_each)
    with rt.session() as session:
        first = list(session.exec(select(Job.id).where(Job.state == "STARTING")))
    call_local(rt, "cancel", {"ids": first})
    for job_id in first:
        _end(rt, job_id)
    Dispatcher(rt).dispatch()
    with rt.session() as session:
        return sorted(session.exec(select(Job.owner).where(Job.state == "STARTING")))


def _end(rt: Runtime, job_id: int) -> None:
    """A cancelled job's worker is gone: the attempt ends and its GPUs are released."""
    with rt.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        host, gpus = job.host, job.gpu_ids or []
        transition(session, JobState.CANCELLED, "its worker is gone", [col(Job.id) == job_id],
                   {"ended_at": time.time()})
        session.commit()
    if host:
        for i in gpus:
            rt.redis.delete(keys.hold(host, i))


# -- why ---------------------------------------------------------------------------------


def test_why_a_job_waits_for_the_jobs_it_runs_after(rt, local):
    _bring_up(rt, "h", 1)
    first = local.submit("sleep 100 # first")
    after = local.submit("true # after", after=[first.id])
    assert _why(local, after.id) == ("DEPENDENCY", f"waiting for job {first.id} to SUCCEED "
                                                   "(--after)")
    assert _why(local, first.id)[0] == "NOT_PENDING"


def test_why_gpus_are_earmarked_for_a_larger_job_ahead(rt, local):
    _bring_up(rt, "h", 2)
    local.submit("sleep 100 # holds GPU 0")
    big = local.submit("true # needs both", gpus=2, priority=5)
    small = local.submit("true # needs one")
    Dispatcher(rt).dispatch()
    assert small.status == "PENDING"
    code, reason = _why(local, small.id)
    assert code == "EARMARKED" and reason.endswith(f"set aside for job {big.id}, ahead of it, "
                                                   "which needs more at once")
    assert _why(local, big.id)[0] == "RESOURCES"


def test_why_the_gpus_it_allows_are_used_outside_gpuq(rt, local):
    _bring_up(rt, "h", 4)
    _foreign(rt, "h", 2)
    _foreign(rt, "h", 3)
    job = local.submit("true # only 2 and 3", gpus=2, allowed_gpu_ids=[2, 3])
    assert job.status == "PENDING"
    assert _why(local, job.id) == ("FOREIGN", "the GPUs it may use are busy with processes "
                                              "outside gpuq on host h (2, 3)")


def test_why_the_worker_of_a_gpu_it_needs_is_down(rt, local):
    _bring_up(rt, "h", 2)
    rt.redis.delete(keys.alive("h", 1))
    job = local.submit("true # on GPU 1", allowed_gpu_ids=[1])
    assert job.status == "PENDING"
    assert _why(local, job.id) == ("WORKER_DOWN", "the worker of GPU 1 on host h, which it "
                                                  "needs, is down (no heartbeat)")


def test_why_no_host_can_ever_fit_it(rt, local):
    _bring_up(rt, "h", 2)
    with rt.session() as session:  # stored while no host had registered (none to refuse it)
        session.execute(insert(Job), [{"command": "true", "gpus": 4, "env": {},
                                       "recover_exit_codes": [], "submitted_at": time.time(),
                                       "owner": "alice", "project": "alice"}])
        session.commit()
        job_id = session.scalar(select(func.max(Job.id)))
    assert _why(local, job_id) == ("NEVER_FITS", "asks for 4 GPUs; the largest registered "
                                                 "host has 2")


def test_why_gpus_run_other_jobs_and_the_queue_deeper_than_a_pass_looks(rt, local):
    _bring_up(rt, "h", 1)
    holder = local.submit("sleep 100 # holds it")
    launch = local.launch("true # deep", num_jobs=rt.settings.dispatch_scan_limit + 5)
    code, reason = _why(local, launch.job_ids[0])
    assert code == "RESOURCES" and f"run gpuq jobs {holder.id}" in reason
    code, reason = _why(local, launch.job_ids[-1])
    assert code == "DEPTH" and "GPUQ_DISPATCH_SCAN_LIMIT" in reason


def test_why_of_another_users_job_is_refused(rt, local):
    job = _as(local, ALICE).submit("true # alice's")
    with pytest.raises(NotPermitted):
        _as(local, BOB).call("why", job_id=job.id)
