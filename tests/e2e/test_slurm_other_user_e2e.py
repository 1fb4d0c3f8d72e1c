"""Another user of the same Slurm cluster cannot break or steer gpuq's view of its jobs:
jobs a second OS user (made here) submits with a newline in their name, or with a working
directory and a name written as Slurm's own `Key=Value` fields naming gpuq's job, change
nothing. gpuq's jobs are submitted and settled as usual while those jobs run and after."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.client import Client
from tests.contract.test_adapters import drive
from tests.contract.test_slurm import slurm  # noqa: F401  (the adapter on the test's cluster)

pytestmark = pytest.mark.e2e


@pytest.fixture
def hostile(other_user: str) -> Iterator[Callable[..., str]]:
    """Submits a job as the other user; returns its id. Every one is cancelled at the end."""
    place = Path(tempfile.mkdtemp(prefix="gpuq-hostile-"))
    place.chmod(0o777)
    ids: list[str] = []

    def submit(name: str, workdir: str | None = None, command: str = "sleep 600") -> str:
        chdir = place / (workdir or "plain")
        chdir.mkdir(mode=0o777, exist_ok=True)
        chdir.chmod(0o777)
        done = subprocess.run(
            ["runuser", "-u", other_user, "--", "sbatch", "--parsable", f"--job-name={name}",
             f"--chdir={chdir}", "--output=/dev/null", f"--wrap={command}"],
            capture_output=True, text=True, timeout=60, cwd=place)
        assert done.returncode == 0, done.stderr
        ids.append(done.stdout.strip().split(";")[0])
        return ids[-1]

    yield submit
    if ids:
        subprocess.run(["scancel", *ids], check=False)
    shutil.rmtree(place, ignore_errors=True)


def _forged(gpuq_id: str) -> str:
    """Text that a parser of `scontrol --oneliner` where later keys win reads as gpuq's job
    having failed."""
    return f"JobId={gpuq_id} JobState=FAILED Reason=Forged ExitCode=3:0"


def test_other_users_crafted_jobs_change_nothing_in_gpuqs_view(
        slurm, local: Client, hostile, other_user):  # noqa: F811
    # Given a gpuq job on Slurm
    first = local.submit("sleep 5; echo first done", backend="slurm")
    slurm.sync()
    first_id = first.row()["backend_id"]
    assert first_id
    # and, from another user of the cluster, a job whose name holds a newline and Slurm's
    # own fields, one whose working directory is Slurm's fields naming gpuq's job, and one
    # such job that has already ended
    hostile(f"x\nJobId={first_id}\nJobId=999999 {_forged(first_id)}")
    hostile(f"y {_forged(first_id)}", workdir=f"w {_forged(first_id)}")
    hostile(f"z\n{_forged(first_id)}", workdir=f"e {_forged(first_id)}", command="true")
    # Then gpuq's view holds only gpuq's jobs
    assert set(slurm.poll([first_id])) == {first_id}
    assert all(name.startswith("gpuq-") for name in slurm.tagged())
    # and its jobs are submitted and settled as Slurm ran them, while the others' jobs run
    ok = local.submit("echo hello", backend="slurm")
    bad = local.submit("exit 9", backend="slurm")
    launch = local.launch("echo rank {rank}", num_jobs=3, backend="slurm")
    ids = [first.id, ok.id, bad.id, *launch.job_ids]
    rows = {r["id"]: r for r in drive(slurm, local, ids, timeout_s=180)}
    assert (rows[first.id]["status"], rows[first.id]["exit_code"]) == ("SUCCEEDED", 0)
    assert (rows[ok.id]["status"], rows[ok.id]["exit_code"]) == ("SUCCEEDED", 0)
    assert (rows[bad.id]["status"], rows[bad.id]["exit_code"]) == ("FAILED", 9)
    assert {rows[i]["status"] for i in launch.job_ids} == {"SUCCEEDED"}
    assert "first done" in first.logs()
    # and after the others' jobs have ended too
    subprocess.run(["runuser", "-u", other_user, "--", "scancel", "-u", other_user],
                   check=True, timeout=60)
    after = local.submit("exit 4", backend="slurm")
    row = drive(slurm, local, [after.id], timeout_s=120)[0]
    assert (row["status"], row["exit_code"]) == ("FAILED", 4)
