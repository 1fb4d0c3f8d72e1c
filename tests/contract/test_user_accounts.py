"""Named users map to OS accounts, and their tokens have a life: the account a user's jobs
run as is chosen when they are added (another account only on a stack run by root, the
stack's own only by choice) and looked up when a job starts; a token can be rotated, can
expire, records its last use once a minute, and an open log stream ends once its token
stops naming its user."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from adapters.process import ProcessAdapter
from app.core.accounts import RunAs, choose_account
from app.core.errors import InvalidArguments, NoRunAccount, UserExists
from app.core.identity import Actor, stack_owner
from app.dashboard import create_app
from app.ops.registry import call_local
from app.store import users
from app.store.models import Job
from scheduler.worker import attempt
from tests.support.dashboard_http import BASE_URL
from tests.support.servers import ROOT, server_env

GPUQ = str(Path(sys.executable).parent / "gpuq")
AS_ROOT = os.geteuid() == 0
ALICE = Actor("alice")
# An unprivileged account every Unix has
NOBODY = pwd.getpwnam("nobody")


def _gpuq(settings, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run([GPUQ, *args], env=server_env(settings, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=60)


def test_a_stack_run_by_root_maps_a_user_to_the_account_of_their_name_or_the_one_given():
    assert choose_account("nobody", None, False, as_root=True) == "nobody"
    assert choose_account("alice", "nobody", False, as_root=True) == "nobody"
    with pytest.raises(InvalidArguments, match=r"no OS account named 'gpuq-no-such' .*"
                       r"`useradd gpuq-no-such`, or give --os-user NAME"):
        choose_account("gpuq-no-such", None, False, as_root=True)
    with pytest.raises(InvalidArguments, match="may not run as root"):
        choose_account("alice", "root", False, as_root=True)
    # The stack's own account is the owner's explicit choice, allowed under root too
    assert choose_account("alice", None, True, as_root=True) is None


def test_a_stack_not_run_by_root_takes_a_named_user_only_on_its_own_account():
    with pytest.raises(InvalidArguments, match=r"does not run as root.*--same-account"):
        choose_account("nobody", None, False, as_root=False)
    with pytest.raises(InvalidArguments, match="does not run as root"):
        choose_account("alice", "nobody", False, as_root=False)
    assert choose_account("alice", None, True, as_root=False) is None
    with pytest.raises(InvalidArguments, match="not both"):
        choose_account("alice", "nobody", True, as_root=False)


def test_run_as_names_the_account_looked_up_now_and_refuses_the_revoked(rt):
    users.add(rt.engine, "carol", same_account=True)
    assert users.run_as(rt.engine, stack_owner().name) is None
    assert users.run_as(rt.engine, "carol") is None
    # A name no token names (the stack's own code acting for it) runs as the stack's
    assert users.run_as(rt.engine, "dave") is None
    users.revoke(rt.engine, "carol")
    with rt.session() as session, pytest.raises(NoRunAccount, match="'carol' is revoked"):
        users.run_as(session, "carol")
    # A mapped user runs as their account, as pwd knows it when asked
    with rt.engine.begin() as conn:
        conn.execute(text("INSERT INTO users (name, token_hash, admin, created_at, os_user, "
                          "same_account) VALUES ('erin', 'h1', false, 0, 'nobody', false), "
                          "('frank', 'h2', false, 0, 'gpuq-gone', false), "
                          "('olga', 'h3', false, 0, NULL, false)"))
    assert users.run_as(rt.engine, "erin") == RunAs("nobody", NOBODY.pw_uid, NOBODY.pw_gid,
                                                    NOBODY.pw_dir, NOBODY.pw_shell)
    with pytest.raises(NoRunAccount, match="'gpuq-gone' of 'frank' is gone"):
        users.run_as(rt.engine, "frank")
    # A user from before accounts keeps running as the stack's account
    assert users.run_as(rt.engine, "olga") is None


@pytest.mark.skipif(not AS_ROOT, reason="only a stack run by root maps users to accounts")
@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "unix:///run/redis.sock"])
def test_a_named_users_job_does_not_run_where_redis_is_open_to_every_account(rt, url):
    # A Redis that asks no password, with no GPUQ_SECRET: any job could send the stack's
    # messages, so none runs as another account there.
    users.add(rt.engine, "alice", os_user="nobody")
    job = Job(id=1, owner="alice", command="true", submitted_at=0.0)
    settings = rt.settings.model_copy(update={"secret": None, "redis_url": url})
    with pytest.raises(NoRunAccount, match="GPUQ_SECRET") as refused:
        attempt._account(SimpleNamespace(settings=settings, session=rt.session), job)
    assert "alice's jobs run as nobody" in str(refused.value)
    adapter = ProcessAdapter()
    adapter.rt = SimpleNamespace(settings=settings, engine=rt.engine)  # type: ignore[assignment]
    with pytest.raises(NoRunAccount, match="GPUQ_SECRET"):
        adapter.account(job)
    # With a secret, or a password in the URL, they run as her account
    for closed in ({"secret": "s" * 32}, {"redis_url": url.replace("://", "://:pw@", 1)},
                   {"redis_url": f"{url}?password=pw"}):
        settings = rt.settings.model_copy(update={"secret": None, "redis_url": url, **closed})
        adapter.rt.settings = settings
        assert attempt._account(SimpleNamespace(settings=settings, session=rt.session),
                                job) == RunAs.of(NOBODY)
        assert adapter.account(job) == RunAs.of(NOBODY)
    # and the stack's owner's jobs run as the stack, open Redis or not
    owner_job = Job(id=2, owner=stack_owner().name, command="true", submitted_at=0.0)
    assert adapter.account(owner_job) is None


@pytest.mark.skipif(not AS_ROOT, reason="only a stack run by root maps users to accounts")
def test_adding_a_user_as_root_records_their_account(rt):
    users.add(rt.engine, "alice", os_user="nobody")
    users.add(rt.engine, "nobody")
    assert {u.name: u.os_user for u in users.list_users(rt.engine)} == {
        "alice": "nobody", "nobody": "nobody"}
    assert users.run_as(rt.engine, "alice") == users.run_as(rt.engine, "nobody") \
        == RunAs.of(NOBODY)


def test_gpuq_user_add_refuses_in_one_line_and_warns_in_one_line(settings):
    refused = _gpuq(settings, "user", "add", "gpuq-no-such")
    assert refused.returncode != 0
    assert refused.stderr.strip().count("\n") == 0
    fix = "`useradd gpuq-no-such`" if AS_ROOT else "--same-account"
    assert refused.stderr.startswith("error: ") and fix in refused.stderr
    added = _gpuq(settings, "user", "add", "alice", "--same-account", "--expires", "90d")
    assert added.returncode == 0, added.stderr
    warning = [line for line in added.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1
    assert "run as the stack's own OS account" in warning[0]
    assert "can read the stack's secrets" in warning[0]
    bad = _gpuq(settings, "user", "add", "bob", "--same-account", "--expires", "soon")
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0
    assert "--expires takes a number of days or hours such as 90d or 12h" in bad.stderr
    # The list shows whose account the jobs run as, the expiry and the last use
    listed = _gpuq(settings, "user", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert (row["name"], row["runs_as"], row["os_user"], row["same_account"]) == (
        "alice", "same account", None, True)
    assert row["expires_at"] is not None and row["last_used_at"] is None
    assert "alice: jobs as same account" in _gpuq(settings, "user", "list").stdout


def test_a_rotated_token_replaces_the_old_one_and_leaves_the_jobs(rt):
    old = users.add(rt.engine, "alice", same_account=True)
    job = call_local(rt, "submit", {"spec": {"command": "true", "gpus": 0}}, ALICE)[
        "job_ids"][0]
    new = users.rotate(rt.engine, "alice")
    assert new != old
    assert users.actor_for_token(rt.engine, old) is None
    assert users.actor_for_token(rt.engine, new) == ALICE
    assert call_local(rt, "job", {"job_id": job}, ALICE)["status"] == "PENDING"


def test_a_revoked_name_added_again_gets_a_fresh_token_and_keeps_its_jobs(rt):
    old = users.add(rt.engine, "alice", same_account=True)
    job = call_local(rt, "submit", {"spec": {"command": "true", "gpus": 0}}, ALICE)[
        "job_ids"][0]
    users.revoke(rt.engine, "alice")
    with pytest.raises(InvalidArguments, match="'alice' is revoked: `gpuq user add alice`"):
        users.rotate(rt.engine, "alice")
    new = users.add(rt.engine, "alice", admin=True, same_account=True)
    assert users.actor_for_token(rt.engine, old) is None
    assert users.actor_for_token(rt.engine, new) == Actor("alice", admin=True)
    [row] = users.list_users(rt.engine)
    assert row.revoked_at is None
    assert call_local(rt, "job", {"job_id": job}, ALICE)["owner"] == "alice"
    # A name not revoked is still taken
    with pytest.raises(UserExists, match="exists already"):
        users.add(rt.engine, "alice", same_account=True)


def test_an_expired_token_names_no_one(rt):
    short = users.add(rt.engine, "alice", same_account=True, expires_s=0.5)
    long = users.add(rt.engine, "bob", same_account=True, expires_s=86400)
    assert users.actor_for_token(rt.engine, short) == ALICE
    time.sleep(0.6)
    assert users.actor_for_token(rt.engine, short) is None
    assert users.actor_for_token(rt.engine, long) == Actor("bob")
    assert users.expiry_seconds("90d") == 90 * 86400
    assert users.expiry_seconds("12h") == 12 * 3600
    for bad in ("0d", "90", "3m", "-1d", "d"):
        with pytest.raises(InvalidArguments, match="90d or 12h"):
            users.expiry_seconds(bad)


def test_a_tokens_use_is_recorded_once_a_minute_at_most(rt):
    token = users.add(rt.engine, "alice", same_account=True)

    def last_used() -> float | None:
        return users.list_users(rt.engine)[0].last_used_at

    assert last_used() is None
    users.actor_for_token(rt.engine, token)
    first = last_used()
    assert first is not None and abs(first - time.time()) < 5
    users.actor_for_token(rt.engine, token)
    assert last_used() == first
    # A minute later, the next use is recorded
    with rt.engine.begin() as conn:
        conn.execute(text("UPDATE users SET last_used_at = last_used_at - 61"))
    users.actor_for_token(rt.engine, token)
    later = last_used()
    assert later is not None and later > first - 61 + 30


@pytest.fixture
def api(settings, local):  # type: ignore[no-untyped-def]
    with TestClient(create_app(settings.model_copy(update={"dashboard_token": "owner-t"}),
                               local), base_url=BASE_URL) as http:
        yield http


def _stream_events(api, job_id: int, token: str) -> list[str]:  # type: ignore[no-untyped-def]
    names = []
    with api.stream("GET", f"/api/jobs/{job_id}/logs/stream",
                    headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                names.append(line.removeprefix("event: "))
    return names


@pytest.mark.parametrize("ends_by", ["revoke", "expiry"])
def test_an_open_log_stream_ends_when_its_token_stops_naming_its_user(api, rt, ends_by):
    # Given alice follows the log of her job, which never starts
    token = users.add(rt.engine, "alice", same_account=True,
                      expires_s=1.0 if ends_by == "expiry" else None)
    job = call_local(rt, "submit", {"spec": {"command": "true", "gpus": 0}}, ALICE)[
        "job_ids"][0]
    # When her token is revoked or expires, then the stream closes within seconds
    revoker = threading.Timer(0.5 if ends_by == "revoke" else 3600, users.revoke,
                              (rt.engine, "alice"))
    revoker.start()
    started = time.monotonic()
    try:
        names = _stream_events(api, job, token)
    finally:
        revoker.cancel()
    assert names == ["closed"]
    assert time.monotonic() - started < 6
    assert api.get("/api/jobs", headers={"Authorization": f"Bearer {token}"}
                   ).status_code == 401
