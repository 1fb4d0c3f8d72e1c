"""A named user cannot raise their own limits by any path of the API, tried as a hostile one
would with her own token over HTTP on a real Redis and database: setting or clearing limits
(hers, everyone's, a project's), granting herself a project, naming a project she is not a
member of or a priority over her max, through every way in (a job, a launch, a jobs file,
the generic operation endpoint), or passing herself off as the owner or an admin. After the
series her limits, the projects and the jobs stored are what the owner made them. (Her jobs'
reach to the stack's files, environments and Redis is tried on real workers in
tests/e2e/test_run_as_owner_e2e.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from app.core.identity import Actor
from app.dashboard import create_app
from app.ops.registry import call_local
from app.runtime import Runtime
from app.store import users
from app.store.models import Job
from tests.support.dashboard_http import BASE_URL

ADMIN = Actor("root", admin=True)
OWNER_TOKEN = "owner-t"


@pytest.fixture
def api(settings, local) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(create_app(settings.model_copy(update={"dashboard_token": OWNER_TOKEN}),
                               local), base_url=BASE_URL) as http:
        yield http


def _limits(rt: Runtime) -> dict[str, Any]:
    return call_local(rt, "limits_table", {"pending": False}, ADMIN)


def _projects(rt: Runtime) -> dict[str, Any]:
    return call_local(rt, "list_projects", {})


# Every request by which she might raise her own limits: (method, path, body).
ATTEMPTS: list[tuple[str, str, Any]] = [
    ("post", "/api/ops/set_limits", {"kind": "user", "name": "alice",
                                     "values": {"max_gpus": 99}}),
    ("post", "/api/ops/set_limits", {"kind": "user", "name": "alice",
                                     "values": {"max_priority": 100}}),
    ("post", "/api/ops/set_limits", {"kind": "user", "name": "alice",
                                     "values": {"default_project": "vision"}}),
    ("post", "/api/ops/set_limits", {"kind": "user", "name": "alice",
                                     "values": {"max_time_s": None}}),
    ("post", "/api/ops/set_limits", {"kind": "user", "name": "*", "values": {"max_gpus": 99}}),
    ("post", "/api/ops/set_limits", {"kind": "project", "name": "alice",
                                     "values": {"max_gpus": 99}}),
    ("post", "/api/ops/clear_limits", {"kind": "user", "name": "alice"}),
    ("post", "/api/ops/clear_limits", {"kind": "user", "name": "*"}),
    ("post", "/api/ops/add_project", {"name": "mine", "members": ["alice"]}),
    ("post", "/api/ops/project_members", {"name": "vision", "add": ["alice"]}),
    # ... as the owner or an admin, by naming one in the arguments
    ("post", "/api/ops/set_limits", {"kind": "user", "name": "alice",
                                     "values": {"max_gpus": 99}, "actor": "root"}),
    ("post", "/api/ops/set_limits", {"kind": "user", "name": "alice",
                                     "values": {"max_gpus": 99},
                                     "actor": {"name": "root", "admin": True}}),
    # ... or by submitting past them, every way in
    ("post", "/api/jobs", {"command": "true", "priority": 5}),
    ("post", "/api/jobs", {"command": "true", "project": "vision"}),
    ("post", "/api/jobs", {"command": "true", "owner": "root"}),
    ("post", "/api/jobs", {"command": "true", "time_limit_s": 7 * 86400}),
    ("post", "/api/launches", {"command": "true {rank}", "num_jobs": 2, "priority": 5}),
    ("post", "/api/launches", {"command": "true {rank}", "num_jobs": 2, "project": "vision"}),
    ("post", "/api/ops/submit", {"spec": {"command": "true", "priority": 5}}),
    ("post", "/api/ops/submit", {"spec": {"command": "true", "project": "vision"}}),
    ("post", "/api/ops/submit", {"spec": {"command": "true"}, "actor": "root"}),
    ("post", "/api/ops/submit", {"spec": {"command": "true", "owner": "root"}}),
    ("post", "/api/ops/submit", {"spec": {"command": "true",
                                          "payload_key": "gpuq:payload:launch:1"}}),
    ("post", "/api/ops/launch", {"spec": {"command": "true", "priority": 5}, "num_jobs": 2}),
    ("post", "/api/ops/submit_many", {"origin": "jobs.txt", "specs": [
        {"command": "true"}, {"command": "true", "priority": 5}]}),
    ("post", "/api/ops/submit_many", {"origin": "jobs.txt", "specs": [
        {"command": "true", "project": "vision"}]}),
    # ... or by reading what the owner may see
    ("get", "/api/limits", None),
    ("get", "/metrics", None),
]


def test_no_path_of_the_api_lets_a_named_user_raise_her_own_limits(api, rt):
    # Given alice held to 1 GPU at priority 0 for at most an hour, and a project she is not
    # a member of
    call_local(rt, "set_limits", {"kind": "user", "name": "alice",
                                  "values": {"max_gpus": 1, "max_priority": 0,
                                             "max_time_s": 3600}}, ADMIN)
    call_local(rt, "add_project", {"name": "vision", "members": ["bob"]}, ADMIN)
    call_local(rt, "set_limits", {"kind": "project", "name": "vision",
                                  "values": {"max_gpus": 8}}, ADMIN)
    limits_before, projects_before = _limits(rt), _projects(rt)
    alice = {"Authorization": f"Bearer {users.add(rt.engine, 'alice', same_account=True)}"}
    # and a job of hers with its hour
    mine = api.post("/api/jobs", headers=alice, json={"command": "sleep 1", "time_limit_s": 3600})
    assert mine.status_code == 201, mine.text
    mine_id = mine.json()["job_ids"][0]
    # When she tries every path, lengthening her job's limit too
    answers = {}
    for method, path, body in [*ATTEMPTS,
                               ("post", "/api/ops/update", {"ids": [mine_id], "time": "2h"}),
                               ("post", "/api/ops/update", {"ids": [mine_id], "time": "none"})]:
        kwargs = {"json": body} if body is not None else {}
        answers[(path, repr(body))] = api.request(method.upper(), path, headers=alice, **kwargs)
    # Then each was refused, with the reason and not a crash
    for (path, body), answer in answers.items():
        assert answer.status_code in (400, 403, 422, 429), (path, body, answer.status_code,
                                                       answer.text)
        if answer.status_code == 403:
            assert answer.json()["code"] == "not_permitted", answer.text
    # and her limits, the projects, and the jobs are what the owner made them: none of hers
    # stored at a priority or in a project past what she was granted, none as another
    assert _limits(rt) == limits_before
    assert _projects(rt) == projects_before
    with rt.session() as session:
        jobs = session.execute(select(Job.owner, Job.priority, Job.project)).all()
    assert all(owner == "alice" and priority <= 0 and project in (None, "", "alice")
               for owner, priority, project in jobs), jobs
    with rt.session() as session:
        assert session.get(Job, mine_id).time_limit_s == 3600
    # while what she is granted still works, as her
    shorter = api.post("/api/ops/update", headers=alice, json={"ids": [mine_id], "time": "30m"})
    assert shorter.status_code == 200, shorter.text
    done = api.post("/api/jobs", headers=alice, json={"command": "true"})
    assert done.status_code == 201, done.text
    with rt.session() as session:
        assert session.get(Job, done.json()["job_ids"][0]).owner == "alice"
