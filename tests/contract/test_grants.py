"""Projects and priorities are granted, on real Redis and a real database: a named user
submits to their default project or one they are a member of, at no more than their and the
project's max_priority; the stack's owner and admins may do anything; `gpuq project`."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import insert, update
from sqlmodel import col, func, select
from typer.testing import CliRunner

from adapters import intent
from app.cli.main import cli
from app.core.errors import NotPermitted
from app.core.identity import Actor
from app.core.states import JobState
from app.ops.registry import call_local
from app.runtime import Runtime
from app.store.jobs import transition
from app.store.models import Job
from scheduler.dispatch.allocator import Dispatcher
from tests.contract.test_allocator import _bring_up

ALICE, BOB, CAROL = Actor("alice"), Actor("bob"), Actor("carol")
ADMIN = Actor("root", admin=True)


def _submit(rt: Runtime, actor: Actor, **spec: object) -> list[int]:
    out = call_local(rt, "submit", {"spec": {"command": "true", **spec},
                                    "allow_duplicate": True}, actor)
    return list(out["job_ids"])


def _launch(rt: Runtime, actor: Actor, num_jobs: int, **spec: object) -> list[int]:
    out = call_local(rt, "launch", {"spec": {"command": "true", **spec},
                                    "num_jobs": num_jobs}, actor)
    return list(out["job_ids"])


def _jobs(rt: Runtime) -> int:
    with rt.session() as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


def _limit(rt: Runtime, kind: str, name: str, **values: object) -> None:
    call_local(rt, "set_limits", {"kind": kind, "name": name, "values": values})


# -- projects ----------------------------------------------------------------------------


def test_a_named_user_may_not_charge_a_project_they_are_not_a_member_of(rt):
    with pytest.raises(NotPermitted, match=r"user alice is not a member of project vision: "
                       r"submit to your default project alice, or ask an admin to add you "
                       r"\(gpuq project members vision --add alice\)"):
        _submit(rt, ALICE, project="vision")
    with pytest.raises(NotPermitted, match="not a member of project vision"):
        _launch(rt, ALICE, 3, project="vision")
    assert _jobs(rt) == 0
    # Their default project (unnamed, or named) they may
    _submit(rt, ALICE)
    _submit(rt, ALICE, project="alice")


def test_members_submit_to_their_project_and_others_stay_out(rt):
    call_local(rt, "add_project", {"name": "vision", "members": ["alice", "bob"]}, ADMIN)
    _submit(rt, ALICE, project="vision")
    _launch(rt, BOB, 2, project="vision")
    with pytest.raises(NotPermitted, match="not a member of project vision"):
        _submit(rt, CAROL, project="vision")
    call_local(rt, "project_members", {"name": "vision", "add": ["carol"],
                                       "remove": ["bob"]}, ADMIN)
    _submit(rt, CAROL, project="vision")
    with pytest.raises(NotPermitted, match="not a member of project vision"):
        _submit(rt, BOB, project="vision")
    listed = call_local(rt, "list_projects", {}, CAROL)
    assert listed == {"projects": [{"name": "vision", "members": ["alice", "carol"]}],
                      "open_projects": False}


def test_a_users_default_project_from_the_limits_needs_no_membership(rt):
    _limit(rt, "user", "alice", default_project="nlp")
    assert _submit(rt, ALICE, project="nlp")
    with pytest.raises(NotPermitted, match="your default project nlp"):
        _submit(rt, ALICE, project="alice")


def test_the_stacks_owner_and_admins_name_any_project(rt):
    _submit(rt, ADMIN, project="vision")
    call_local(rt, "submit", {"spec": {"command": "true # owner", "project": "nlp"}})
    assert _jobs(rt) == 2


def test_only_an_admin_grants_projects(rt):
    with pytest.raises(NotPermitted, match="an admin's to add"):
        call_local(rt, "add_project", {"name": "vision", "members": ["alice"]}, ALICE)
    call_local(rt, "add_project", {"name": "vision", "members": ["bob"]}, ADMIN)
    with pytest.raises(NotPermitted, match="an admin's to change"):
        call_local(rt, "project_members", {"name": "vision", "add": ["alice"]}, ALICE)
    # Reading the members is anyone's
    assert call_local(rt, "project_members", {"name": "vision"}, ALICE)["members"] == ["bob"]


def test_open_projects_keeps_anyone_naming_any_project_and_says_so(rt):
    rt.settings = rt.settings.model_copy(update={"open_projects": True})
    _submit(rt, ALICE, project="vision")
    assert call_local(rt, "limits_table", {})["open_projects"] is True


# -- priorities --------------------------------------------------------------------------


def test_a_named_user_may_not_raise_priority_above_0_unless_granted(rt):
    _submit(rt, ALICE, priority=0)
    _submit(rt, ALICE, priority=-5)
    with pytest.raises(NotPermitted, match=r"priority 5 is over user alice's max_priority 0: "
                       r"submit at 0 or lower, or ask an admin to raise it \(gpuq limits set "
                       r"--user alice --max-priority N\)"):
        _submit(rt, ALICE, priority=5)
    with pytest.raises(NotPermitted, match="max_priority 0"):
        _launch(rt, ALICE, 2, priority=1)
    _limit(rt, "user", "alice", max_priority=10)
    _launch(rt, ALICE, 2, priority=10)
    with pytest.raises(NotPermitted, match="max_priority 10"):
        _submit(rt, ALICE, priority=11)


def test_a_projects_max_priority_holds_its_members_and_not_admins(rt):
    call_local(rt, "add_project", {"name": "vision", "members": ["alice"]}, ADMIN)
    _limit(rt, "user", "alice", max_priority=50)
    _limit(rt, "project", "vision", max_priority=3)
    _submit(rt, ALICE, project="vision", priority=3)
    with pytest.raises(NotPermitted, match=r"over project vision's max_priority 3.*"
                       r"--project vision --max-priority N"):
        _submit(rt, ALICE, project="vision", priority=4)
    _submit(rt, ALICE, priority=50)  # in her own project her own limit holds
    # The stack's owner and admins have no limit
    _submit(rt, ADMIN, project="vision", priority=1000)
    call_local(rt, "submit", {"spec": {"command": "true # owner", "priority": 900}})


def test_everyones_max_priority_is_the_star_entry(rt):
    _limit(rt, "user", "*", max_priority=2)
    _submit(rt, BOB, priority=2)
    with pytest.raises(NotPermitted, match="max_priority 2"):
        _submit(rt, BOB, priority=3)


# -- the CLI -----------------------------------------------------------------------------


def test_gpuq_project_adds_changes_and_lists_members(settings, monkeypatch, rt):
    for key, value in settings.as_environment().items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    added = runner.invoke(cli, ["project", "add", "vision", "--member", "alice,bob"])
    assert added.exit_code == 0 and "project vision: alice, bob" in added.output
    changed = runner.invoke(cli, ["project", "members", "vision", "--add", "carol",
                                  "--remove", "bob"])
    assert "project vision: alice, carol" in changed.output
    again = runner.invoke(cli, ["project", "add", "vision", "--member", "dan"])
    assert again.exit_code != 0 and "gpuq project members vision --add USER" in str(
        again.exception)
    listed = runner.invoke(cli, ["project", "list", "--json"])
    assert json.loads(listed.output)["projects"] == [{"name": "vision",
                                                      "members": ["alice", "carol"]}]
    _submit(rt, CAROL, project="vision")


def test_gpuq_limits_sets_and_shows_max_priority_and_open_projects(settings, monkeypatch):
    for key, value in settings.as_environment().items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    out = runner.invoke(cli, ["limits", "set", "--user", "alice", "--max-priority", "10"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(cli, ["limits", "set", "--project", "vision", "--max-priority", "3"])
    assert out.exit_code == 0, out.output
    listed = json.loads(runner.invoke(cli, ["limits", "--json"]).output)
    by_name = {(e["kind"], e["name"]): e["max_priority"] for e in listed["entries"]}
    assert by_name[("user", "alice")] == 10 and by_name[("project", "vision")] == 3
    assert listed["open_projects"] is False
    monkeypatch.setenv("GPUQ_OPEN_PROJECTS", "true")
    shown = runner.invoke(cli, ["limits"])
    assert "projects open to everyone (GPUQ_OPEN_PROJECTS)" in shown.output, shown.output


# -- batch GPUs count toward limits and fair share ---------------------------------------


def _on_batch(rt: Runtime, owner: str, gpus: int, state: str = "RUNNING") -> int:
    """A job of `owner` at a batch backend, holding `gpus` GPUs there."""
    with rt.session() as session:
        session.execute(insert(Job), [{
            "command": "true # on slurm", "gpus": gpus, "env": {}, "recover_exit_codes": [],
            "submitted_at": time.time(), "started_at": time.time(), "owner": owner,
            "project": owner, "backend": "slurm", "backend_id": "42", "state": state}])
        session.commit()
        return int(session.scalar(select(func.max(Job.id))) or 0)


def test_a_batch_jobs_gpus_count_toward_its_owners_max_gpus(rt, local):
    _bring_up(rt, "h", 4)
    _limit(rt, "user", "alice", max_gpus=2)
    _on_batch(rt, "alice", 2)
    job = local.acting_for(ALICE).submit("sleep 100 # local")
    Dispatcher(rt).dispatch()
    assert job.status == "PENDING"
    out = local.call("why", job_id=job.id)
    assert out["code"] == "LIMIT" and "user alice runs 2/2 GPUs" in out["reason"]
    table = {(e["kind"], e["name"]): e for e in local.call("limits_table")["entries"]}
    assert table[("user", "alice")]["running_gpus"] == 2


def test_a_batch_job_over_max_gpus_is_not_taken_for_submission(rt):
    _limit(rt, "user", "alice", max_gpus=2)
    _on_batch(rt, "alice", 1)
    waiting = [_on_batch(rt, "alice", 1, state="PENDING") for _ in range(2)]
    with rt.session() as session:
        jobs = list(session.exec(select(Job).where(col(Job.id).in_(waiting))
                                 .order_by(col(Job.id))))
        taken = intent.claim(session, jobs, "slurm", rt.settings)
    assert [j.id for j in taken] == waiting[:1]


def test_batch_gpus_running_count_in_fair_share(rt, local):
    _bring_up(rt, "h", 1)
    _on_batch(rt, "bob", 4)
    holder = local.submit("sleep 100 # holds the GPU")
    older = local.acting_for(BOB).submit("true # bob, first in time")
    newer = local.acting_for(ALICE).submit("true # alice, later")
    out = local.call("why", job_id=older.id)
    assert out["code"] == "FAIR_SHARE" and out["reason"].startswith(
        "behind user alice in fair share")
    assert holder.status == "STARTING" and newer.status == "PENDING"


def test_an_ended_batch_attempt_is_charged_to_fair_share_usage(rt, local):
    job = _on_batch(rt, "bob", 2)
    with rt.session() as session:
        session.execute(update(Job).where(col(Job.id) == job)
                        .values(started_at=time.time() - 1800))
        transition(session, JobState.SUCCEEDED, None, [col(Job.id) == job])
    table = {(e["kind"], e["name"]): e for e in local.call("limits_table")["entries"]}
    assert table[("user", "bob")]["usage_gpu_hours"] >= 0.99  # 2 GPUs for half an hour
