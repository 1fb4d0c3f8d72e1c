"""On Slurm too, a named user's job runs as their own OS account where the stack runs as
root: sbatch `--uid`, on the single-node cluster of deploy/slurm/. Alice's job has her uid,
HOME and USER and its secret, and reaches none of the stack's secrets; its output, secrets
and result stay in her area of the store, which Bob's job cannot read; a job she submits
herself under a gpuq job's name is never taken for gpuq's."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from secrets import token_hex

import cloudpickle
import pytest
from sqlmodel import col, update

from adapters import intent
from adapters.slurm import SlurmAdapter
from app.client import Client
from app.core.accounts import login_umask
from app.core.errors import UserExists
from app.core.identity import Actor
from app.core.settings import Settings
from app.dashboard.auth import dashboard_token
from app.store import users
from app.store.models import Job
from tests.contract.test_adapters import drive
from tests.contract.test_slurm import slurm  # noqa: F401  (the adapter on the test's cluster)
from tests.e2e.test_run_as_owner_e2e import ACCOUNTS, accounts  # noqa: F401

pytestmark = pytest.mark.e2e
SECRET = "alices-own-api-token"


@pytest.fixture(autouse=True)
def _signed(settings: Settings) -> None:
    """Where Redis asks no password (the machine's), no job runs as another account
    without a GPUQ_SECRET."""
    settings.secret = token_hex(32)


@pytest.fixture
def shared(slurm: SlurmAdapter, monkeypatch) -> Iterator[Path]:  # noqa: F811
    """A store every account may pass through (as GPUQ_SLURM_SHARED_DIR on a cluster) and a
    runner the accounts can run: the system's Python with cloudpickle and the runner
    copied beside it, as an install outside root's home gives them."""
    place = Path(tempfile.mkdtemp(prefix="gpuq-slurm-shared-"))
    place.chmod(0o711)
    runner = place / "runner"
    (runner / "adapters").mkdir(parents=True)
    shutil.copytree(Path(cloudpickle.__file__).parent, runner / "cloudpickle")
    for name in ("__init__.py", "runner.py"):
        shutil.copy(Path(__file__).parents[2] / "adapters" / name, runner / "adapters" / name)
    for folder in [runner, *runner.rglob("*")]:
        folder.chmod(0o755 if folder.is_dir() else 0o644)
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None or not os.access(python, os.X_OK):
        pytest.skip("no system python3 for the accounts to run")
    slurm.rt.settings.slurm_shared_dir = place / "store"
    slurm.rt.settings.batch_python = python
    monkeypatch.setenv("PYTHONPATH", str(runner))
    yield place / "store"
    shutil.rmtree(place, ignore_errors=True)


def _as(local: Client, user: str) -> Client:
    with contextlib.suppress(UserExists):  # added by an earlier test of the module
        users.add(local.rt.engine, user, os_user=ACCOUNTS[user])
    return local.acting_for(Actor(user))


def _give(local: Client, user: str, *job_ids: int) -> None:
    """Jobs the stack's owner submitted, made `user`'s before they reach Slurm: the way
    to give a named user's job a secret and a function (which only the owner may
    submit) and see that they too stay in her area."""
    with local.rt.session() as session:
        session.execute(update(Job).where(col(Job.id).in_(job_ids)).values(owner=user))


def test_a_named_users_slurm_job_runs_as_their_account_in_their_area(
        slurm, shared, local: Client, accounts):  # noqa: F811
    alice_os, bob_os = accounts[ACCOUNTS["alice"]], accounts[ACCOUNTS["bob"]]
    home = local.settings.home
    dashboard_token(local.settings)
    secrets = [home / "dashboard.token", home / "gpuq.db"]
    probes = "; ".join(f"cat {p} >/dev/null 2>&1 && echo read:{p} || echo denied:{p}"
                       for p in secrets)
    _as(local, "alice")
    bob = _as(local, "bob")
    # When alice's jobs, a command with a secret and a function, go to Slurm
    job = local.submit(f"echo uid=$(id -u) home=$HOME user=$USER secret=$API_TOKEN "
                       f"umask=$(umask); {probes}; "
                       "echo hers > $HOME/slurm-mine.txt", backend="slurm",
                       secrets={"API_TOKEN": SECRET})
    square = local.submit(lambda x: x * x, 7, backend="slurm")
    _give(local, "alice", job.id, square.id)
    old = os.umask(0o077)  # gpuq's own, which her job does not start with
    try:
        rows = {r["id"]: r for r in drive(slurm, local, [job.id, square.id], timeout_s=180)}
    finally:
        os.umask(old)
    # Then both ran as her account
    assert rows[job.id]["status"] == "SUCCEEDED", job.logs()
    log = job.logs()
    assert (f"uid={alice_os.pw_uid} home={alice_os.pw_dir} user={alice_os.pw_name} "
            f"secret={SECRET} umask={login_umask():04o}") in log, log
    assert "read:" not in log and log.count("denied:") == len(secrets), log
    assert os.stat(f"{alice_os.pw_dir}/slurm-mine.txt").st_uid == alice_os.pw_uid
    assert rows[square.id]["status"] == "SUCCEEDED", square.logs()
    assert square.result(timeout_s=30) == 49
    # in her area (0700, hers), where her output is and her secrets file is gone
    area = slurm.users_dir() / "alice"
    found = os.lstat(area)
    assert (found.st_uid, stat.S_IMODE(found.st_mode)) == (alice_os.pw_uid, 0o700)
    output = area / f"{rows[job.id]['backend_id']}.out"
    assert os.stat(output).st_uid == alice_os.pw_uid
    assert not list(area.glob("secrets.*")), "the runner took its secrets file"
    assert SECRET not in subprocess.run(["scontrol", "show", "job", "--details"],
                                        capture_output=True, text=True).stdout
    # When bob's job tries her output and her area
    theirs = bob.submit(f"for f in {output} {area}; do cat $f >/dev/null 2>&1 && echo read:$f "
                        "|| ls $f >/dev/null 2>&1 && echo read:$f || echo denied:$f; done; "
                        "echo uid=$(id -u)", backend="slurm")
    [row] = drive(slurm, local, [theirs.id], timeout_s=180)
    # Then it ran as him and reached neither
    log = theirs.logs()
    assert row["status"] == "SUCCEEDED", log
    assert f"uid={bob_os.pw_uid}" in log and "read:" not in log and log.count("denied:") == 2, log


def test_her_area_holding_a_link_in_place_of_her_output_shows_nothing_of_the_stack(
        slurm, shared, local: Client, accounts):  # noqa: F811
    alice_os = accounts[ACCOUNTS["alice"]]
    alice = _as(local, "alice")
    job = alice.submit("echo mine", backend="slurm")
    [row] = drive(slurm, local, [job.id], timeout_s=180)
    assert "mine" in job.logs()
    # When her own process swaps her output for a link to the stack's token
    output = slurm.users_dir() / "alice" / f"{row['backend_id']}.out"
    token = dashboard_token(local.settings)
    subprocess.run(["runuser", "-u", alice_os.pw_name, "--", "sh", "-c",
                    f"rm -f {output} && ln -s {local.settings.home}/dashboard.token {output}"],
                   check=True)
    assert output.is_symlink()
    # Then gpuq (as root) reads nothing through it
    assert token not in job.logs()


def test_a_job_named_like_gpuqs_belongs_to_gpuq_only_as_the_account_it_runs_as(
        slurm, shared, local: Client, accounts):  # noqa: F811
    alice, bob = _as(local, "alice"), _as(local, "bob")
    mine = alice.submit("sleep 30", backend="slurm")
    slurm.sync()
    assert mine.row()["backend_id"]
    # When alice submits a job of her own under the tag a job of bob's would have
    bobs = bob.submit("true", backend="slurm")
    with local.rt.session() as session:
        forged = intent.tag(slurm.install, session.get(Job, bobs.id), 1)
    done = subprocess.run(["runuser", "-u", ACCOUNTS["alice"], "--", "sbatch", "--parsable",
                           f"--job-name={forged}", "--output=/dev/null", "--chdir=/tmp",
                           "--wrap=sleep 60"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    try:
        tagged = slurm.tagged()
    finally:
        subprocess.run(["scancel", done.stdout.strip().split(";")[0]], check=False)
    # Then gpuq finds her job it submitted, as her account, and not the forged one
    own = [name for name, handle in tagged.items() if handle == mine.row()["backend_id"]]
    assert len(own) == 1
    assert forged not in tagged


def test_a_store_the_accounts_cannot_reach_keeps_the_job_waiting_with_the_fix(
        slurm, local: Client, accounts):  # noqa: F811
    # gpuq's home (0700) holds the store when no shared directory is set
    alice = _as(local, "alice")
    job = alice.submit("true", backend="slurm")
    slurm.sync()
    row = job.row()
    assert row["status"] == "PENDING" and not row["backend_id"]
    assert "GPUQ_SLURM_SHARED_DIR" in row["reason"] and "gpuq-alice" in row["reason"], row
