"""Named users are people: on a stack run by root, each one's jobs run as their own OS
account, on real workers. Alice's job runs with her uid and cannot read the stack's token,
database, secrets key or any gpuq process's environment; her files are hers; Bob's job
cannot read her files or her log."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from secrets import token_hex

import pytest

from app.client import Client
from app.core import sealing
from app.core.accounts import login_umask
from app.core.identity import Actor
from app.core.settings import Settings
from app.dashboard.auth import dashboard_token
from app.ops.registry import call_local
from app.store import embedded_redis, users
from tests.support.servers import missing, processes_with

pytestmark = pytest.mark.e2e

ACCOUNTS = {"alice": "gpuq-alice", "bob": "gpuq-bob"}  # gpuq user -> OS account


@pytest.fixture(scope="module")
def stack_settings(stack_settings: Settings) -> Iterator[Settings]:
    """The module's stack, signed: where its Redis asks no password (the machine's), no
    job runs as another account without a GPUQ_SECRET. Its processes start with a umask
    no login has, so that a job's own is seen to be its account's."""
    stack_settings.secret = token_hex(32)
    old = os.umask(0o077)
    yield stack_settings
    os.umask(old)


@pytest.fixture(scope="module")
def accounts() -> Iterator[dict[str, pwd.struct_passwd]]:
    """Two OS accounts with homes of their own (0700), made for the module and removed."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("setpriv"):
        missing("running jobs as other OS accounts needs root, useradd and setpriv")
    made = []
    try:
        for account in ACCOUNTS.values():
            if subprocess.run(["id", account], capture_output=True).returncode != 0:
                subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", account],
                               check=True)
                made.append(account)
            entry = pwd.getpwnam(account)
            os.chmod(entry.pw_dir, 0o700)
        yield {account: pwd.getpwnam(account) for account in ACCOUNTS.values()}
    finally:
        for account in made:
            subprocess.run(["userdel", "--remove", account], capture_output=True)


def _submit_as(client: Client, user: str, script: str) -> int:
    with contextlib.suppress(Exception):
        users.add(client.rt.engine, user, os_user=ACCOUNTS[user])
    spec = {"command": f"bash -c {script!r}", "gpus": 1}
    return int(call_local(client.rt, "submit", {"spec": spec}, Actor(user))["job_ids"][0])


def test_each_named_users_job_runs_as_their_account_and_reaches_none_of_the_stacks(
        client: Client, stack_settings, accounts):
    alice, bob = accounts[ACCOUNTS["alice"]], accounts[ACCOUNTS["bob"]]
    home = stack_settings.home
    dashboard_token(stack_settings)  # the stack's secrets, as a running stack keeps them
    sealing.key_material(None, home, create=True)
    worker = processes_with(f"@{stack_settings.hostname}")[0]
    stack_settings.redis_dir.mkdir(mode=0o700, exist_ok=True)
    embedded_redis.password(stack_settings)  # as the embedded Redis keeps its password
    secrets = [home / "dashboard.token", home / "gpuq.db", home / sealing.LOCAL_KEY_FILE,
               stack_settings.redis_dir / embedded_redis.PASSWORD_FILE,
               f"/proc/{worker}/environ", f"/proc/{worker}/mem"]
    probes = "; ".join(f"cat {path} >/dev/null 2>&1 && echo read:{path} || echo denied:{path}"
                       for path in secrets)
    # ... and the files that would raise her own limits: the limits file and the database
    writable = [home / "limits.toml", home / "gpuq.db"]
    probes += "; " + "; ".join(f"echo x 2>/dev/null >> {path} && echo wrote:{path} || "
                               f"echo denied:{path}" for path in writable)
    # When alice's job reports who it is, tries the stack's secrets and writes a file
    mine = _submit_as(client, "alice", f"echo uid=$(id -u) home=$HOME user=$USER "
                      f"umask=$(umask); {probes}; "
                      "echo hers > $HOME/mine.txt")
    assert client.job(mine).wait(timeout_s=60) == "SUCCEEDED", client.job(mine).logs()
    log = client.job(mine).logs()
    # Then it ran as her, reached none of the stack's secrets, and its file is hers
    assert (f"uid={alice.pw_uid} home={alice.pw_dir} user={alice.pw_name} "
            f"umask={login_umask():04o}") in log, log
    assert "read:" not in log and "wrote:" not in log, log
    assert log.count("denied:") == len(secrets) + len(writable), log
    assert os.stat(f"{alice.pw_dir}/mine.txt").st_uid == alice.pw_uid
    # When bob's job tries her file and her log
    alice_log = home / "logs" / f"{mine}.log"
    theirs = _submit_as(client, "bob", f"echo uid=$(id -u); for f in {alice.pw_dir}/mine.txt "
                        f"{alice_log}; do cat $f >/dev/null 2>&1 && echo read:$f || "
                        "echo denied:$f; done")
    assert client.job(theirs).wait(timeout_s=60) == "SUCCEEDED", client.job(theirs).logs()
    log = client.job(theirs).logs()
    # Then it ran as him and read neither
    assert f"uid={bob.pw_uid}" in log and "read:" not in log and log.count("denied:") == 2, log


def test_a_job_whose_owner_was_revoked_does_not_run(client: Client, accounts):
    users.add(client.rt.engine, "carol", same_account=True)
    job = int(call_local(client.rt, "submit", {"spec": {"command": "echo ran", "gpus": 1,
                                                         "after": []}}, Actor("carol"))[
        "job_ids"][0])
    assert client.job(job).wait(timeout_s=60) == "SUCCEEDED"
    users.revoke(client.rt.engine, "carol")
    again = int(call_local(client.rt, "submit", {"spec": {"command": "echo again", "gpus": 1}},
                           Actor("carol"))["job_ids"][0])
    assert client.job(again).wait(timeout_s=60) == "FAILED"
    assert "revoked" in (client.rows([again])[0]["reason"] or "")
