"""What a named user sees, on a real Redis and database: their own jobs, counts and usage in
full; of other users' jobs at most that some exist, never an id, name, command or owner
(`gpuq why`, `gpuq status`, `gpuq limits`, `--after`, the dashboard's GPU page, /metrics
and /api/limits). The stack's owner and admins see everything."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.core import keys
from app.core.errors import NotPermitted
from app.core.identity import Actor, sees, stack_owner
from app.dashboard import create_app
from app.ops.registry import call_local
from app.runtime import Runtime
from app.store import cluster, users
from tests.contract.test_allocator import _bring_up
from tests.contract.test_shares import _used
from tests.support.dashboard_http import BASE_URL

ALICE, BOB, CAROL = Actor("alice"), Actor("bob"), Actor("carol")
ADMIN = Actor("ops", admin=True)


def _submit(rt: Runtime, actor: Actor | None, command: str, **spec: object) -> int:
    out = call_local(rt, "submit", {"spec": {"command": command, **spec}}, actor)
    return int(out["job_ids"][0])


def _why(rt: Runtime, actor: Actor | None, job_id: int) -> tuple[str, str]:
    out = call_local(rt, "why", {"job_id": job_id}, actor)
    return out["code"], out["reason"]


def test_a_user_sees_their_own_and_the_owner_and_admins_see_everyones():
    assert sees(ALICE, "alice") and not sees(ALICE, "bob")
    assert sees(ADMIN, "bob") and sees(stack_owner(), "bob") and sees(None, "bob")


def test_why_counts_other_users_jobs_ahead_without_naming_them(rt):
    _bring_up(rt, "h", 1)
    holder = _submit(rt, CAROL, "sleep 100 # holds the GPU")
    # (an admin lets bob raise his priority: a named user's is at most 0 unless granted)
    call_local(rt, "set_limits", {"kind": "user", "name": "bob", "values": {"max_priority": 5}})
    urgent = _submit(rt, BOB, "true # bob, urgent", priority=5)
    mine = _submit(rt, ALICE, "true # alice")
    code, reason = _why(rt, ALICE, mine)
    assert (code, reason) == ("PRIORITY", "behind 1 job of other users, of higher priority")
    # The stack's owner is told which job it is
    assert _why(rt, None, mine) == ("PRIORITY", f"behind 1 job of higher priority (first: "
                                                f"job {urgent})")
    # Bob's own job waits for GPUs that run carol's: a count, not her job's id
    assert _why(rt, BOB, urgent) == (
        "RESOURCES", "waiting for GPUs: those it may use run 1 job of other users")
    assert f"gpuq jobs {holder}" in _why(rt, ADMIN, urgent)[1]
    # A page of the queue explains alice's job in the same words
    [row] = call_local(rt, "queue", {}, ALICE)["jobs"]
    assert (row["why"], row["why_reason"]) == _why(rt, ALICE, mine)


def test_why_in_fair_share_names_no_other_user(rt):
    _bring_up(rt, "h", 1)
    _submit(rt, CAROL, "sleep 100 # holds the GPU")
    _used(rt, "alice", 10.0)
    older = _submit(rt, ALICE, "true # alice, first in time")
    _submit(rt, BOB, "true # bob, later")
    code, reason = _why(rt, ALICE, older)
    assert code == "FAIR_SHARE" and "bob" not in reason and "carol" not in reason
    assert reason.startswith("behind jobs of another user in fair share")
    assert _why(rt, None, older)[1].startswith("behind user bob in fair share")


def test_a_dependency_on_a_job_the_user_may_not_see_is_counted_not_named(rt):
    theirs = _submit(rt, BOB, "sleep 100 # bob's")
    # An admin may run a job of alice's after bob's (a named user may not: below)
    with rt.session() as session:
        from app.store.jobs import create_jobs
        from app.store.spec import JobSpec

        _, [after] = create_jobs(session, JobSpec(command="true", after=[theirs], gpus=0), 1,
                                 launch=False, owner="alice", viewer=ADMIN)
        session.commit()
    assert _why(rt, ALICE, after) == ("DEPENDENCY", "waiting for 1 job of other users to "
                                                    "SUCCEED (--after)")
    assert _why(rt, None, after) == ("DEPENDENCY", f"waiting for job {theirs} to SUCCEED "
                                                   "(--after)")
    # Nor does the job's page name it
    assert call_local(rt, "job", {"job_id": after}, ALICE)["after"] is None
    assert call_local(rt, "job", {"job_id": after}, None)["after"] == [theirs]


def test_after_another_users_job_is_refused_as_reading_it(rt):
    theirs = _submit(rt, BOB, "sleep 100", gpus=0)
    ended = _submit(rt, BOB, "false", gpus=0)
    call_local(rt, "cancel", {"ids": [ended]})
    with pytest.raises(NotPermitted) as reading:
        call_local(rt, "job", {"job_id": theirs}, ALICE)
    for op, extra in (("submit", {}), ("launch", {"num_jobs": 2})):
        with pytest.raises(NotPermitted) as after:
            call_local(rt, op, {"spec": {"command": "true", "gpus": 0, "after": [theirs]},
                                **extra}, ALICE)
        assert str(after.value) == str(reading.value)
    # An ended job of another's is refused the same way: its state is not told
    with pytest.raises(NotPermitted) as after_ended:
        call_local(rt, "submit", {"spec": {"command": "true", "after": [ended]}}, ALICE)
    assert "CANCELLED" not in str(after_ended.value)
    assert str(after_ended.value) == str(reading.value).replace(str(theirs), str(ended))
    assert call_local(rt, "queue", {}, ALICE)["total"] == 0
    # Their own jobs and an admin's view of bob's are as before
    mine = _submit(rt, ALICE, "true", gpus=0)
    assert _submit(rt, ALICE, "true # after mine", gpus=0, after=[mine])
    assert _submit(rt, ADMIN, "true # after bob's", gpus=0, after=[theirs])


def test_status_and_limits_give_a_user_no_other_users_rows(rt):
    _bring_up(rt, "h", 1)
    _submit(rt, BOB, "sleep 100 # holds the GPU")
    _used(rt, "alice", 2.0)
    status = call_local(rt, "status", {}, ALICE)
    assert status["limits"] is None and status["counts"]  # counts of every job, no names
    assert {e["name"] for e in call_local(rt, "status", {}, None)["limits"]["entries"]} >= {
        "alice", "bob"}
    table = call_local(rt, "limits_table", {}, ALICE)
    assert [(e["kind"], e["name"]) for e in table["entries"]] == [("user", "alice")]
    assert len(call_local(rt, "limits_table", {}, ADMIN)["entries"]) > 1


@pytest.fixture
def api(settings, local) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(create_app(settings.model_copy(update={"dashboard_token": "owner-t"}),
                               local), base_url=BASE_URL) as http:
        yield http


def test_metrics_and_limits_are_the_owners_and_admins_only(api, rt):
    alice = {"Authorization": f"Bearer {users.add(rt.engine, 'alice', same_account=True)}"}
    admin = {"Authorization": "Bearer " + users.add(rt.engine, "ops", admin=True,
                                                    same_account=True)}
    for path in ("/metrics", "/api/limits"):
        refused = api.get(path, headers=alice)
        assert refused.status_code == 403, path
        assert refused.json()["code"] == "not_permitted"
        assert "you (alice)" in refused.json()["message"]
        assert api.get(path, headers=admin).status_code == 200
        assert api.get(path, headers={"Authorization": "Bearer owner-t"}).status_code == 200


def test_the_gpu_page_shows_a_user_no_other_users_jobs_nor_per_user_rows(api, rt):
    alice = {"Authorization": f"Bearer {users.add(rt.engine, 'alice', same_account=True)}"}
    cluster.register_host(rt.redis, "h1", {0: {"name": "fake"}, 1: {"name": "fake"}})
    mine = _submit(rt, ALICE, "a", gpus=0)
    theirs = _submit(rt, BOB, "b", gpus=0)
    rt.redis.set(keys.hold("h1", 0), f"{mine}.1")
    rt.redis.set(keys.hold("h1", 1), f"{theirs}.1")
    _used(rt, "bob", 1.0)
    for path in ("/gpus", "/partials/gpus"):
        page = api.get(path, headers=alice).text
        assert f'href="/jobs/{mine}"' in page
        assert f'href="/jobs/{theirs}"' not in page
        assert "Users and projects" not in page and "bob" not in page
    owners = api.get("/gpus", headers={"Authorization": "Bearer owner-t"}).text
    assert f'href="/jobs/{theirs}"' in owners and "Users and projects" in owners
    # Over HTTP, --after another's job is 403 as reading it is
    refused = api.post("/api/jobs", json={"command": "true", "gpus": 0, "after": [theirs]},
                       headers=alice)
    assert refused.status_code == 403 and refused.json() == api.get(
        f"/api/jobs/{theirs}", headers=alice).json()
