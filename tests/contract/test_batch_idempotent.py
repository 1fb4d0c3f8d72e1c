"""Batch submission is idempotent, on the real single-node Slurm of deploy/slurm/: a sync
killed between `sbatch` and its record, two syncs at once, a split array whose second
`sbatch` fails, an `sbatch` that never answers, and a cancel racing a submit. Each job
counts its own runs, so "ran once" is what the jobs say, not what gpuq believes.

`sbatch` is a wrapper on PATH in front of the real one; what each call does is set per call
number in its directory (mode.N: hold, fail, lose, hang; else it passes through)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapters.slurm import SlurmAdapter
from app.client import Client
from app.core import keys
from app.core.settings import Settings
from app.runtime import Runtime
from tests.contract.test_adapters import drive, slurm_missing
from tests.support.servers import missing, server_env, until

pytestmark = pytest.mark.e2e

WRAPPER = """#!/bin/bash
d="$(dirname "$0")"
n=$(( $(cat "$d/calls" 2>/dev/null || echo 0) + 1 )); echo $n > "$d/calls"
case "$(cat "$d/mode.$n" 2>/dev/null)" in
  fail) echo "sbatch: error: Batch job submission failed: Invalid partition name" >&2; exit 1;;
  hold) echo $$ > "$d/held"; while [ ! -e "$d/go" ]; do sleep 0.1; done
        out="$(REAL "$@")" || exit $?; echo "$out" > "$d/id.$n"; echo "$out";;
  lose) out="$(REAL "$@")" || exit $?; echo "$out" > "$d/id.$n"; echo $$ > "$d/held"
        exec sleep 600;;
  hang) echo $$ > "$d/held"; exec sleep 600;;
  *) out="$(REAL "$@")" || exit $?; echo "$out" > "$d/id.$n"; echo "$out";;
esac
"""

SYNC = """
import sys
from adapters.slurm import SlurmAdapter
from app.core.settings import Settings
from app.runtime import Runtime
adapter = SlurmAdapter()
adapter.rt = Runtime(Settings())
adapter.sync_lock_s = float(sys.argv[1])
print(adapter.sync(), flush=True)
"""


class Sbatch:
    """The wrapper's directory: what each call does, and what it saw."""

    def __init__(self, root: Path) -> None:
        self.dir = root

    def mode(self, call: int, mode: str) -> None:
        (self.dir / f"mode.{call}").write_text(mode)

    @property
    def calls(self) -> int:
        path = self.dir / "calls"
        return int(path.read_text()) if path.exists() else 0

    def held(self) -> int | None:
        path = self.dir / "held"
        return int(path.read_text()) if path.exists() and path.read_text().strip() else None

    def release(self) -> None:
        (self.dir / "go").touch()

    def ids(self) -> list[str]:
        return [p.read_text().strip().split(";")[0] for p in sorted(self.dir.glob("id.*"))]


@pytest.fixture
def sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sbatch]:
    if why := slurm_missing():
        missing(why)
    real = shutil.which("sbatch")
    assert real is not None
    root = tmp_path / "sbatch-wrapper"
    root.mkdir()
    script = root / "sbatch"
    script.write_text(WRAPPER.replace("REAL", real))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{root}:{os.environ['PATH']}")
    wrapper = Sbatch(root)
    yield wrapper
    wrapper.release()
    if (held := wrapper.held()) is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(held, signal.SIGKILL)
    if ids := wrapper.ids():
        subprocess.run(["scancel", *ids], check=False)


@pytest.fixture
def slurm(rt: Runtime, sbatch: Sbatch) -> SlurmAdapter:
    adapter = SlurmAdapter()
    adapter.rt = rt
    adapter.vanished_grace_s = 0.5
    return adapter


@pytest.fixture
def sync_process(settings: Settings, tmp_path: Path
                 ) -> Iterator[Callable[[float], subprocess.Popen[bytes]]]:
    """Start a sync in a process of its own, as the control worker runs it."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(lock_s: float) -> subprocess.Popen[bytes]:
        with open(tmp_path / "sync.log", "ab") as out:
            procs.append(subprocess.Popen([sys.executable, "-c", SYNC, str(lock_s)],
                                          env=server_env(settings, PATH=os.environ["PATH"]),
                                          stdout=out, stderr=subprocess.STDOUT,
                                          cwd=Path(__file__).resolve().parents[1]))
        return procs[-1]

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _launch(client: Client, out: Path, num_jobs: int, command: str = "") -> list[int]:
    """A launch whose every replica appends a line to its rank's file, then runs `command`."""
    out.mkdir(exist_ok=True)
    handle = client.launch(f"echo ran >> {out}/{{rank}}; {command or 'true'}",
                           num_jobs=num_jobs, backend="slurm")
    return handle.job_ids


def _runs(out: Path, num_jobs: int) -> list[int]:
    return [len((out / str(rank)).read_text().split()) if (out / str(rank)).exists() else 0
            for rank in range(num_jobs)]


def test_a_sync_killed_between_sbatch_and_its_record_is_adopted_not_resubmitted(
        slurm, sbatch, local, sync_process, tmp_path: Path):
    # Given a launch, and a sync whose sbatch submits it and then never returns
    out = tmp_path / "runs"
    ids = _launch(local, out, 3)
    sbatch.mode(1, "lose")
    proc = sync_process(3)
    # When that sync's process is SIGKILLed after Slurm took the array
    until(sbatch.held, timeout_s=60)
    proc.kill()
    proc.wait()
    assert {r["status"] for r in local.rows(ids)} == {"STARTING"}
    assert not any(r["backend_id"] for r in local.rows(ids)), "its ids were never recorded"
    # Then the next sync (once the dead one's lock has expired) adopts that array
    rows = drive(slurm, local, ids, timeout_s=90)
    assert {r["status"] for r in rows} == {"SUCCEEDED"}
    (array,) = sbatch.ids()
    assert sorted(r["backend_id"] for r in rows) == [f"{array}_{i}" for i in range(3)]
    assert _runs(out, 3) == [1, 1, 1], "every replica ran once"
    assert sbatch.calls == 1, "nothing was submitted again"


def test_two_concurrent_syncs_submit_each_row_once(slurm, sbatch, local, sync_process,
                                                   tmp_path: Path):
    # Given a launch, and a sync held inside its sbatch
    out = tmp_path / "runs"
    ids = _launch(local, out, 4)
    sbatch.mode(1, "hold")
    proc = sync_process(300)
    until(sbatch.held, timeout_s=60)
    # When a second sync starts meanwhile, it leaves the backend to the running one
    assert slurm.sync() == {"skipped": 1}
    # And when the lock is lost (a Redis restarted without persistence), a third sync that
    # does run submits none of the rows the first one is submitting
    slurm.rt.redis.delete(keys.batch_sync_lock("slurm"))
    assert slurm.sync()["submitted"] == 0
    sbatch.release()
    assert proc.wait(timeout=60) == 0
    rows = drive(slurm, local, ids, timeout_s=90)
    assert {r["status"] for r in rows} == {"SUCCEEDED"}
    assert sbatch.calls == 1 and _runs(out, 4) == [1, 1, 1, 1]


def test_a_split_arrays_failed_second_part_is_completed_without_resubmitting_the_first(
        slurm, sbatch, local, tmp_path: Path):
    # Given a launch of 5 split into arrays of 3 and 2, whose second sbatch fails
    slurm.config["MaxArraySize"] = "3"
    slurm.refused_retry_s = 0
    out = tmp_path / "runs"
    ids = _launch(local, out, 5)
    sbatch.mode(2, "fail")
    # When a sync submits it
    assert slurm.sync()["submitted"] == 3
    rows = {r["rank"]: r for r in local.rows(ids)}
    assert [rows[rank]["status"] for rank in (3, 4)] == ["PENDING", "PENDING"]
    assert "Invalid partition" in rows[3]["reason"]
    # Then later syncs submit only the second part, and every rank runs once
    rows = {r["rank"]: r for r in drive(slurm, local, ids, timeout_s=90)}
    assert {r["status"] for r in rows.values()} == {"SUCCEEDED"}
    assert sbatch.calls == 3, "part 1, part 2 refused, part 2 again"
    assert _runs(out, 5) == [1, 1, 1, 1, 1]
    first, second = rows[0]["backend_id"].split("_")[0], rows[3]["backend_id"].split("_")[0]
    assert {rows[r]["backend_id"].split("_")[0] for r in (0, 1, 2)} == {first} != {second}


@pytest.mark.parametrize("mode", ["lose", "hang"])
def test_an_sbatch_that_never_answers_is_caught_and_its_rows_end_up_submitted_once(
        slurm, sbatch, local, tmp_path: Path, mode: str):
    # Given an sbatch that does not answer: it submitted the job first (lose) or not (hang)
    slurm.call_timeout_s = 2
    slurm.unrecorded_timeout_s = 3
    out = tmp_path / "runs"
    ids = _launch(local, out, 2)
    sbatch.mode(1, mode)
    # When a sync calls it, the time-out is caught and the rows wait for the look-up
    assert slurm.sync()["submitted"] == 0
    assert {r["status"] for r in local.rows(ids)} == {"STARTING"}
    # Then later syncs adopt the job Slurm has, or submit again what it never got
    rows = drive(slurm, local, ids, timeout_s=90)
    assert {r["status"] for r in rows} == {"SUCCEEDED"}
    assert _runs(out, 2) == [1, 1]
    assert sbatch.calls == (1 if mode == "lose" else 2)


def test_a_cancel_racing_a_submit_reaches_the_backend_job(slurm, sbatch, local,
                                                           sync_process):
    # Given a job whose sync is inside sbatch
    job = local.submit("sleep 300", backend="slurm")
    sbatch.mode(1, "hold")
    proc = sync_process(300)
    until(sbatch.held, timeout_s=60)
    # When it is cancelled before its backend id is recorded
    assert job.cancel() == {"cancelled": [], "cancelling": [job.id]}
    sbatch.release()
    assert proc.wait(timeout=60) == 0
    # Then the Slurm job that sbatch made is cancelled too, and the job ends CANCELLED
    (backend_id,) = sbatch.ids()
    until(lambda: _slurm_state(backend_id) in ("CANCELLED", ""), timeout_s=60)
    rows = drive(slurm, local, [job.id], timeout_s=60)
    assert (rows[0]["status"], rows[0]["backend_id"]) == ("CANCELLED", backend_id)


def _slurm_state(backend_id: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", "--oneliner", backend_id],
                           capture_output=True, text=True, check=False).stdout
    return next((f.split("=", 1)[1] for f in shown.split() if f.startswith("JobState=")), "")


def test_a_job_cancelled_while_its_sbatch_hangs_ends_cancelled_after_the_bound(
        slurm, sbatch, local):
    # Given a job whose sbatch never answered and never submitted it
    slurm.call_timeout_s = 2
    slurm.unrecorded_timeout_s = 3
    job = local.submit("sleep 300", backend="slurm")
    sbatch.mode(1, "hang")
    assert slurm.sync()["submitted"] == 0
    # When it is cancelled while gpuq cannot know whether Slurm has it
    assert job.cancel() == {"cancelled": [], "cancelling": [job.id]}
    # Then it ends CANCELLED once the bound has passed with no such job at Slurm, and
    # nothing was submitted for it again
    rows = drive(slurm, local, [job.id], timeout_s=60)
    assert (rows[0]["status"], rows[0]["backend_id"]) == ("CANCELLED", None)
    assert sbatch.calls == 1


def test_a_sync_asked_for_while_one_runs_is_run_by_that_one(slurm, sbatch, local,
                                                           sync_process):
    # Given a sync held inside sbatch for a first job
    first = local.submit("true", backend="slurm")
    sbatch.mode(1, "hold")
    proc = sync_process(300)
    until(sbatch.held, timeout_s=60)
    # When a second job is submitted and its nudge finds the backend busy
    second = local.submit("true", backend="slurm", allow_duplicate=True)
    assert slurm.sync() == {"skipped": 1}
    sbatch.release()
    assert proc.wait(timeout=60) == 0
    # Then the running sync passed again and submitted the second job too
    assert second.row()["backend_id"] and first.row()["backend_id"]
    assert sbatch.calls == 2
