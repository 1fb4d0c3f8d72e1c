"""Projects and priorities are granted, on real Redis and a real database: a named user
submits to their default project or one they are a member of, at no more than their and the
project's max_priority; the stack's owner and admins may do anything; `gpuq project`."""

from __future__ import annotations

import json

import pytest
from sqlmodel import func, select
from typer.testing import CliRunner

from app.cli.main import cli
from app.core.errors import NotPermitted
from app.core.identity import Actor
from app.ops.registry import call_local
from app.runtime import Runtime
from app.store.models import Job

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
