"""Named users: tokens printed once and kept only hashed, revoked at once; and the operations
layer acting for two users in process: each sees, reads and cancels only their own jobs,
an admin and the stack's owner every job. The dashboard takes a user's token and acts for
them; the client's http transport finds the token and refuses a file others may read."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.client.http import default_transport, token_of
from app.core.errors import InvalidArguments, InvalidToken, NotPermitted, UserExists
from app.core.identity import Actor, stack_owner
from app.core.settings import Settings
from app.dashboard import create_app
from app.ops.registry import call_local
from app.store import users
from tests.support.dashboard_http import BASE_URL

ALICE = Actor("alice")
BOB = Actor("bob")


def test_a_token_is_given_once_and_kept_only_as_its_hash(rt):
    token = users.add(rt.engine, "alice", same_account=True)
    assert token.startswith("gpuq_") and len(token) > 40
    with rt.engine.connect() as conn:
        stored = conn.execute(text("SELECT name, token_hash, admin, revoked_at FROM users")
                              ).one()
    assert stored == ("alice", hashlib.sha256(token.encode()).hexdigest(), False, None)
    # Nothing in the database holds the token itself
    with rt.engine.connect() as conn:
        dumped = " ".join(str(v) for row in conn.execute(text("SELECT * FROM users"))
                          for v in row)
    assert token not in dumped
    # A second add gives another token
    assert users.add(rt.engine, "bob", admin=True, same_account=True) != token


def test_a_token_names_its_user_until_revoked(rt):
    alice = users.add(rt.engine, "alice", same_account=True)
    admin = users.add(rt.engine, "ops", admin=True, same_account=True)
    assert users.actor_for_token(rt.engine, alice) == ALICE
    assert users.actor_for_token(rt.engine, admin) == Actor("ops", admin=True)
    assert users.actor_for_token(rt.engine, alice + "x") is None
    assert users.actor_for_token(rt.engine, "not-a-token") is None
    users.revoke(rt.engine, "alice")
    assert users.actor_for_token(rt.engine, alice) is None
    assert users.actor_for_token(rt.engine, admin) is not None
    listed = {u.name: u for u in users.list_users(rt.engine)}
    assert set(listed) == {"alice", "ops"}
    assert listed["alice"].revoked_at is not None and listed["ops"].revoked_at is None
    assert listed["ops"].admin and not listed["alice"].admin


@pytest.mark.parametrize(("name", "error", "says"), [
    ("a b", InvalidArguments, "letters, digits"),
    ("-x", InvalidArguments, "starting with a letter or digit"),
    ("x" * 65, InvalidArguments, "up to 64"),
    ("evil\x1b[2J", InvalidArguments, "bad user name"),
])
def test_bad_user_names_are_refused_naming_the_rule(rt, name, error, says):
    with pytest.raises(error, match=says.replace("[", r"\[")):
        users.add(rt.engine, name, same_account=True)
    assert users.list_users(rt.engine) == []


def test_a_name_taken_or_the_stack_owners_is_refused(rt):
    users.add(rt.engine, "alice", same_account=True)
    with pytest.raises(UserExists, match="exists already"):
        users.add(rt.engine, "alice", same_account=True)
    with pytest.raises(InvalidArguments, match="stack's owner"):
        users.add(rt.engine, stack_owner().name, same_account=True)


def _submit(rt, actor, command):  # type: ignore[no-untyped-def]
    return call_local(rt, "submit", {"spec": {"command": command, "gpus": 0}}, actor)[
        "job_ids"][0]


def test_each_user_sees_reads_and_cancels_only_their_own_jobs(rt):
    mine = _submit(rt, ALICE, "echo alice")
    theirs = _submit(rt, BOB, "echo bob")
    owners = _submit(rt, None, "echo owner")
    # The queue shows each user their own jobs, with a total of their own
    page = call_local(rt, "queue", {}, ALICE)
    assert [(r["id"], r["owner"]) for r in page["jobs"]] == [(mine, "alice")]
    assert page["total"] == 1
    assert call_local(rt, "queue", {"ids": [theirs, owners]}, ALICE)["jobs"] == []
    # Another's job cannot be read, its log neither
    for op, kwargs in (("job", {"job_id": theirs}), ("logs", {"job_id": owners})):
        with pytest.raises(NotPermitted, match="belongs to another user"):
            call_local(rt, op, kwargs, ALICE)
    assert call_local(rt, "job", {"job_id": mine}, ALICE)["owner"] == "alice"
    # Cancelling another's job is refused and changes nothing
    before = call_local(rt, "job", {"job_id": mine}, None)["events"]
    with pytest.raises(NotPermitted, match=f"job {theirs} belongs to another user"):
        call_local(rt, "cancel", {"ids": [mine, theirs]}, ALICE)
    assert call_local(rt, "job", {"job_id": mine}, None)["events"] == before
    # --all reaches only one's own
    out = call_local(rt, "cancel", {"all_jobs": True}, ALICE)
    assert out["cancelled"] + out["cancelling"] == [mine]
    rows = {r["id"]: r for r in call_local(rt, "queue", {}, None)["jobs"]}
    assert [i for i, r in rows.items() if r["status"].startswith("CANCEL")] == [mine]
    # The stack's owner and an admin see every job and their owners
    assert {i: r["owner"] for i, r in rows.items()} == {
        mine: "alice", theirs: "bob", owners: stack_owner().name}
    assert call_local(rt, "queue", {}, Actor("ops", admin=True))["total"] == 3
    out = call_local(rt, "cancel", {"ids": [theirs]}, Actor("ops", admin=True))
    assert out["cancelled"] + out["cancelling"] == [theirs]


def test_launches_are_their_owners(rt):
    spec = {"command": "echo {rank}", "gpus": 0}
    alices = call_local(rt, "launch", {"spec": spec, "num_jobs": 2}, ALICE)["launch_id"]
    bobs = call_local(rt, "launch", {"spec": spec, "num_jobs": 2}, BOB)["launch_id"]
    assert [r["id"] for r in call_local(rt, "launches", {}, ALICE)["launches"]] == [alices]
    with pytest.raises(NotPermitted, match=f"launch {bobs} belongs to another user"):
        call_local(rt, "launches", {"launch_id": bobs}, ALICE)
    with pytest.raises(NotPermitted):
        call_local(rt, "cancel", {"launch_id": bobs}, ALICE)
    assert {r["owner"] for r in call_local(rt, "queue", {"launch_id": alices}, None)[
        "jobs"]} == {"alice"}
    assert len(call_local(rt, "launches", {}, None)["launches"]) == 2


def test_an_identical_job_of_another_user_is_not_a_duplicate(rt):
    first = _submit(rt, ALICE, "python train.py")
    assert _submit(rt, BOB, "python train.py") != first
    with pytest.raises(Exception, match=f"an identical job {first}"):
        _submit(rt, ALICE, "python train.py")


def test_a_named_user_cannot_name_a_stored_payload_nor_submit_a_jobs_file(rt, local):
    # The owner's job with a secret: its payload key would hand its secret to another's job
    handle = local.submit("env", secrets={"TOKEN": "s3cret"}, gpus=0)
    with rt.engine.connect() as conn:
        key = conn.execute(text("SELECT payload_key FROM jobs WHERE id = :id"),
                           {"id": handle.id}).scalar()
    assert key
    with pytest.raises(NotPermitted, match="stored payload"):
        call_local(rt, "submit", {"spec": {"command": "env", "gpus": 0, "payload_key": key}},
                   BOB)
    with pytest.raises(NotPermitted, match="jobs file"):
        call_local(rt, "submit_many", {"origin": "/tmp/jobs.txt",
                                       "specs": [{"command": "true"}]}, BOB)
    assert call_local(rt, "queue", {}, None)["total"] == 1


def test_status_shows_a_user_the_gpus_their_own_jobs_hold_only(rt):
    from app.core import keys
    from app.store import cluster

    cluster.register_host(rt.redis, "h1", {0: {"name": "fake"}, 1: {"name": "fake"}})
    mine, theirs = _submit(rt, ALICE, "a"), _submit(rt, BOB, "b")
    rt.redis.set(keys.hold("h1", 0), f"{mine}.1")
    rt.redis.set(keys.hold("h1", 1), f"{theirs}.1")

    def held(actor: Actor | None) -> dict[int, int | None]:
        return {g["index"]: g["job_id"] for h in call_local(rt, "status", {}, actor)["hosts"]
                for g in h["gpus"]}

    assert held(None) == {0: mine, 1: theirs}
    assert held(ALICE) == {0: mine, 1: None}


@pytest.fixture
def api(settings, local):  # type: ignore[no-untyped-def]
    with TestClient(create_app(settings.model_copy(update={"dashboard_token": "owner-t"}),
                               local), base_url=BASE_URL) as http:
        yield http


def test_the_dashboard_acts_for_the_user_whose_token_it_is_shown(api, rt):
    alice = users.add(rt.engine, "alice", same_account=True)
    owners = _submit(rt, None, "echo owner")
    as_alice = {"Authorization": f"Bearer {alice}"}
    assert api.post("/api/ops/queue", json={}).status_code == 401
    assert api.post("/api/ops/queue", json={},
                    headers={"Authorization": "Bearer gpuq_nobody"}).status_code == 401
    submitted = api.post("/api/ops/submit", json={"spec": {"command": "echo a", "gpus": 0}},
                         headers=as_alice)
    assert submitted.status_code == 200, submitted.text
    mine = submitted.json()["job_ids"][0]
    assert [r["id"] for r in api.get("/api/jobs", headers=as_alice).json()["jobs"]] == [mine]
    refused = api.post(f"/api/jobs/{owners}/cancel", headers=as_alice)
    assert refused.status_code == 403 and refused.json()["code"] == "not_permitted"
    assert api.get(f"/api/jobs/{owners}/logs", headers=as_alice).status_code == 403
    unknown = api.post("/api/ops/bogus", json={}, headers=as_alice)
    assert (unknown.status_code, unknown.json()["code"]) == (400, "unknown_operation")
    # The owner's token sees both
    owner = api.get("/api/jobs", headers={"Authorization": "Bearer owner-t"}).json()
    assert {r["owner"] for r in owner["jobs"]} == {"alice", stack_owner().name}
    users.revoke(rt.engine, "alice")
    assert api.get("/api/jobs", headers=as_alice).status_code == 401


def test_the_token_comes_from_the_environment_or_a_file_only_its_owner_reads(tmp_path: Path):
    file = tmp_path / "token"
    bare = Settings(url="http://127.0.0.1:1", token_file=file, _env_file=None)
    assert token_of(bare) is None and default_transport(bare) == "local"
    file.write_text("gpuq_fromfile\n")
    file.chmod(0o644)
    with pytest.raises(InvalidToken, match=rf"open to other users \(mode 0644\).*chmod 600 "
                       rf"{file}"):
        token_of(bare)
    file.chmod(0o600)
    assert token_of(bare) == "gpuq_fromfile" and default_transport(bare) == "http"
    given = bare.model_copy(update={"token": "gpuq_fromenv"})
    assert token_of(given) == "gpuq_fromenv"
    # Without an address the token alone changes nothing
    assert default_transport(given.model_copy(update={"url": None})) == "local"
