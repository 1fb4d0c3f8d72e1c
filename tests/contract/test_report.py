"""Accounting reports: `gpuq report` adds up what the attempts used, each attempt keeps its
GPUs' figures, and accounting.report's totals on a database of made-up attempts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from sqlmodel import select

from app.client import Client
from app.core.errors import InvalidArguments
from app.core.identity import Actor
from app.ops.registry import call_local
from app.store import accounting
from app.store.models import Attempt
from scheduler.worker.figures import Figures
from scheduler.worker.monitor import write_fake_foreign_use
from tests.e2e.test_cli_e2e import gpuq
from tests.support.servers import until

END_STATES = {"SUCCEEDED", "FAILED", "CANCELLED", "LOST"}


def _span(client: Client, job_id: int) -> tuple[float, float]:
    """The job's RUNNING event's time and its end event's time."""
    events = client.call("job", job_id=job_id)["events"]
    start = next(e["at"] for e in events if e["to"] == "RUNNING")
    end = next(e["at"] for e in reversed(events) if e["to"] in END_STATES)
    return start, end


@pytest.mark.e2e
def test_report_adds_up_gpus_times_each_attempts_span(client: Client, stack_settings):
    # Given jobs of one and two GPUs, of two users and two projects, run to their end
    alice = client.acting_for(Actor("alice"))
    for project in ("alpha", "beta"):  # an admin lets alice charge both
        client.call("project_members", name=project, add=["alice"])
    submitted = [(client, 1, "alpha", "sleep 1"), (client, 2, "beta", "sleep 1.2"),
                 (alice, 1, "beta", "sleep 0.8"), (alice, 2, "alpha", "sleep 0.6"),
                 (client, 1, "beta", "sleep 0.7")]
    jobs = [(who.submit(command, gpus=gpus, project=project, allow_duplicate=True), gpus,
             project) for who, gpus, project, command in submitted]
    for handle, *_ in jobs:
        assert handle.wait(timeout_s=110) == "SUCCEEDED"
    owners = {handle.id: client.call("job", job_id=handle.id)["owner"] for handle, *_ in jobs}
    # When the report is asked for, by project and by user
    by_project = json.loads(gpuq(stack_settings, "report", "--by", "project", "--json").stdout)
    by_user = json.loads(gpuq(stack_settings, "report", "--since", "1h", "--by", "user",
                              "--json").stdout)
    # Then each group's GPU-seconds are its attempts' GPUs x (end - start), from the events
    expected_project: dict[str, float] = {}
    expected_user: dict[str, float] = {}
    for handle, gpus, project in jobs:
        start, end = _span(client, handle.id)
        expected_project[project] = expected_project.get(project, 0.0) + gpus * (end - start)
        owner = owners[handle.id]
        expected_user[owner] = expected_user.get(owner, 0.0) + gpus * (end - start)
    got_project = {k: v["gpu_seconds"] for k, v in by_project["groups"].items()}
    got_user = {k: v["gpu_seconds"] for k, v in by_user["groups"].items()}
    assert set(got_project) == {"alpha", "beta"} and set(got_user) == set(expected_user)
    assert "alice" in got_user and len(got_user) == 2
    for got, expected in ((got_project, expected_project), (got_user, expected_user)):
        assert sum(abs(got[k] - expected[k]) for k in expected) < 1.0, (got, expected)
        assert abs(sum(got.values()) - sum(expected.values())) < 1.0
    assert by_project["groups"]["beta"]["jobs"] == 3
    assert by_project["groups"]["alpha"]["success_rate"] == 1.0
    assert abs(by_project["groups"]["alpha"]["gpu_hours"] * 3600
               - got_project["alpha"]) < 1e-6
    # And a named user who is not an admin sees their own attempts only
    own = alice.call("report", by="project")
    assert sum(g["jobs"] for g in own["groups"].values()) == 2
    # And the table shows every group
    table = gpuq(stack_settings, "report", "--by", "project")
    assert table.returncode == 0, table.stderr
    assert "alpha" in table.stdout and "beta" in table.stdout and "GPU-hours" in table.stdout


@pytest.mark.e2e
def test_an_attempt_keeps_its_gpus_peak_memory_and_mean_utilisation(
        client: Client, stack_settings, tmp_path: Path):
    # Given a job that runs until told to end
    go = tmp_path / "go"
    handle = client.submit(["bash", "-c", f"until [ -e {go} ]; do sleep 0.1; done"],
                           gpus=1, project="figures", allow_duplicate=True)
    row = until(lambda: (r := client.call("job", job_id=handle.id))["status"] == "RUNNING"
                and r, timeout_s=110)
    index = row["gpu_ids"][0]
    try:
        # When its GPU shows 3000 MB and 70 % while it runs
        write_fake_foreign_use(stack_settings.home, index, 3000, 70)

        def reading() -> dict | None:
            for host in client.call("status")["hosts"]:
                for gpu in host["gpus"]:
                    if host["host"] == stack_settings.hostname and gpu["index"] == index:
                        return gpu["reading"]
            return None

        shown = until(lambda: (r := reading()) and r["memory_used_mb"] == 3000 and r,
                      timeout_s=30, describe=reading)
        assert not shown["foreign"], "a GPU gpuq holds shows its job's use, not foreign use"
        go.touch()
        assert handle.wait(timeout_s=60) == "SUCCEEDED"
        # Then its attempt records them, in the job operation and in `gpuq job ID --json`
        attempts = until(lambda: (a := client.call("job", job_id=handle.id)["attempts"])
                         and a[0]["peak_memory_mb"] is not None and a, timeout_s=30)
    finally:
        write_fake_foreign_use(stack_settings.home, index, 0, 0)
    assert attempts[0]["peak_memory_mb"] == 3000
    assert 0 < attempts[0]["mean_utilization_pct"] <= 70
    shown_json = json.loads(gpuq(stack_settings, "job", str(handle.id), "--json").stdout)
    assert shown_json["attempts"][0]["peak_memory_mb"] == 3000
    assert shown_json["attempts"][0]["outcome"] == "SUCCEEDED"
    view = gpuq(stack_settings, "job", str(handle.id))
    assert view.returncode == 0, view.stderr
    assert "3000 MiB" in view.stdout and "SUCCEEDED" in view.stdout
    report = client.call("report", by="project")["groups"]["figures"]
    assert report["peak_memory_mb"] == 3000 and report["mean_utilization_pct"] > 0


# -- accounting.report on made-up attempts --------------------------------------------------

def _attempt(job_id: int, *, owner: str = "bob", project: str = "p1", attempt: int = 1,
             launch_id: int | None = None, gpus: int = 1, start: float = 1000.0,
             seconds: float = 100.0, outcome: str = "SUCCEEDED", wait_s: float | None = 5.0,
             peak: int | None = None, util: float | None = None) -> Attempt:
    return Attempt(job_id=job_id, attempt=attempt, owner=owner, project=project,
                   launch_id=launch_id, backend="local", host="h", gpu_ids=list(range(gpus)),
                   gpus=gpus, started_at=start, ended_at=start + seconds,
                   gpu_seconds=gpus * seconds, outcome=outcome, wait_s=wait_s,
                   peak_memory_mb=peak, mean_utilization_pct=util)


def _run_attempt(session, job_id: int, start: float, end: float, exit_code: int) -> str:
    """One attempt of a stored job as the dispatcher, the worker and the restart policy
    write it: STARTING, RUNNING at `start`, and its end at `end`; the state it went to."""
    from sqlmodel import col

    from app.core.states import JobState
    from app.store import restart_policy
    from app.store.jobs import move
    from app.store.models import Job

    job = session.get(Job, job_id)
    move(session, job_id, JobState.STARTING, values={
        "attempt": job.attempt + 1, "host": "h", "gpu_ids": list(range(job.gpus))})
    move(session, job_id, JobState.RUNNING, values={"started_at": start})
    session.expire_all()
    job = session.get(Job, job_id)
    moved = restart_policy.apply(session, job, restart_policy.AttemptEnd(exit_code=exit_code),
                                 restart_policy.ended_values(job, end, exit_code))
    session.expire_all()
    assert moved is not None
    return session.exec(select(Job.state).where(col(Job.id) == job_id)).one()


def _job(session, owner: str, project: str, max_restarts: int, submitted_at: float) -> int:
    from sqlalchemy import update

    from app.store.jobs import create_jobs
    from app.store.models import Job
    from app.store.spec import JobSpec

    spec = JobSpec(command=f"python run.py {owner}", max_restarts=max_restarts,
                   project=project)
    (job_id,) = create_jobs(session, spec, 1, launch=False, owner=owner)[1]
    session.execute(update(Job).where(Job.id == job_id).values(submitted_at=submitted_at))
    return job_id


@pytest.fixture
def recorded(rt):
    with rt.session() as session:
        session.add_all([
            # (ids far from those of the jobs stored below)
            _attempt(101, gpus=2, seconds=1800, wait_s=10, peak=1000, util=50),
            _attempt(103, owner="carol", project="p2", launch_id=7, seconds=3600, wait_s=2),
            _attempt(104, owner="carol", project="p1", launch_id=7, start=10.0, seconds=10),
        ])
        # A job of bob's that failed its first attempt, restarted, and succeeded
        job = _job(session, "bob", "p1", max_restarts=1, submitted_at=970.0)
        assert _run_attempt(session, job, 1000.0, 1060.0, exit_code=1) == "PENDING"
        assert _run_attempt(session, job, 1100.0, 1160.0, exit_code=0) == "SUCCEEDED"
        accounting.note_figures(session, job, 2, peak_memory_mb=4000, mean_utilization_pct=90.0)
        session.commit()
    return rt


def test_report_groups_by_user_project_and_launch(recorded):
    with recorded.session() as session:
        by_user = accounting.report(session, since=500.0, by="user")
        by_project = accounting.report(session, since=500.0, by="project")
        by_launch = accounting.report(session, since=0.0, by="launch")
    bob = by_user["bob"]
    assert bob["gpu_seconds"] == 3600 + 60 + 60 and bob["gpu_hours"] == pytest.approx(
        3720 / 3600)
    assert (bob["jobs"], bob["attempts"]) == (2, 3)
    # Both jobs succeeded in the end, one of them on its restart
    assert bob["success_rate"] == 1.0
    assert bob["mean_wait_s"] == pytest.approx(20.0)  # first attempts only
    assert bob["mean_utilization_pct"] == pytest.approx(70.0)
    assert bob["peak_memory_mb"] == 4000
    assert by_user["carol"]["jobs"] == 1  # job 4 ended before `since`
    assert by_user["carol"]["peak_memory_mb"] is None
    assert by_user["carol"]["mean_utilization_pct"] is None
    assert set(by_project) == {"p1", "p2"} and by_project["p2"]["gpu_seconds"] == 3600
    assert by_launch["7"]["jobs"] == 2 and by_launch["-"]["jobs"] == 2


def test_success_is_per_job_and_read_from_its_last_attempt_in_the_window(rt):
    with rt.session() as session:
        # Restarted then succeeded; failed for good after a restart; failed, restart to come
        again_ok = _job(session, "erin", "p", max_restarts=1, submitted_at=0.0)
        _run_attempt(session, again_ok, 100.0, 110.0, exit_code=1)
        _run_attempt(session, again_ok, 200.0, 210.0, exit_code=0)
        again_bad = _job(session, "erin", "p", max_restarts=1, submitted_at=0.0)
        _run_attempt(session, again_bad, 100.0, 110.0, exit_code=1)
        assert _run_attempt(session, again_bad, 200.0, 210.0, exit_code=2) == "FAILED"
        restarting = _job(session, "erin", "p", max_restarts=3, submitted_at=0.0)
        assert _run_attempt(session, restarting, 100.0, 110.0, exit_code=1) == "PENDING"
        session.commit()
        outcomes = sorted(a["outcome"] for job in (again_ok, again_bad, restarting)
                          for a in accounting.of_job(session, job))
        erin = accounting.report(session, since=0.0, by="user")["erin"]
        # A window that holds only the second attempts
        late = accounting.report(session, since=150.0, by="user")["erin"]
    assert outcomes == ["FAILED", "RECOVERING", "RECOVERING", "RECOVERING", "SUCCEEDED"]
    assert (erin["jobs"], erin["attempts"]) == (3, 5)
    assert erin["success_rate"] == 0.5  # of the two jobs that ended, one succeeded
    assert (late["jobs"], late["attempts"], late["success_rate"]) == (2, 2, 0.5)


def test_report_since_filter_and_owner(recorded):
    with recorded.session() as session:
        assert accounting.report(session, since=1e12, by="user") == {}
        only = accounting.report(session, since=0.0, by="project", owner="carol")
    assert set(only) == {"p1", "p2"} and only["p1"]["gpu_seconds"] == 10


def test_report_operation_keeps_a_named_user_to_their_own(recorded):
    now = time.time()
    with recorded.session() as session:
        session.add(_attempt(9, owner="alice", start=now - 60, seconds=30))
        session.add(_attempt(10, owner="bob", start=now - 60, seconds=30))
    mine = call_local(recorded, "report", {"since": "1h"}, Actor("alice"))
    assert set(mine["groups"]) == {"alice"} and mine["by"] == "user"
    everyone = call_local(recorded, "report", {"since": "1h", "by": "user"})
    assert set(everyone["groups"]) == {"alice", "bob"}
    with pytest.raises(InvalidArguments, match="choose one of user, project, launch") as e:
        call_local(recorded, "report", {"by": "host"})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("span", "seconds"), [
    ("7d", 7 * 86400), ("12h", 43200), ("30m", 1800), ("90s", 90), ("45", 45), (" 1.5H ", 5400),
])
def test_seconds_reads_spans(span, seconds):
    assert accounting.seconds(span) == seconds


@pytest.mark.parametrize("span", ["", "7w", "abc", "-1d", "nan", "inf"])
def test_seconds_refuses_a_bad_span_in_one_line(span):
    with pytest.raises(InvalidArguments, match="--since takes a span such as 7d") as e:
        accounting.seconds(span)
    assert "\n" not in str(e.value)


# -- the sampler's arithmetic ---------------------------------------------------------------

def test_figures_count_each_reading_of_the_run_once():
    figures = Figures("h", [0, 1])
    figures.began(os.getpid())
    t = figures.started_at or 0.0
    figures.ended_at = t + 10  # readings after it do not count either
    before = {"at": t - 5, "memory_used_mb": 9999, "utilization_pct": 100}
    figures.add([(0, before), (1, before)])  # read before the job started: not counted
    first = [(0, {"at": t + 1, "memory_used_mb": 1000, "utilization_pct": 20}),
             (1, {"at": t + 1, "memory_used_mb": 2000, "utilization_pct": 40})]
    figures.add(first)
    figures.add(first)  # the same readings sampled again count once
    figures.add([(0, {"at": t + 2, "memory_used_mb": 500, "utilization_pct": 60})])
    figures.add([(0, {"at": t + 11, "memory_used_mb": 9999, "utilization_pct": 0})])
    assert figures.result() == (3000, 40.0)


def test_figures_prefer_the_jobs_own_processes_memory():
    figures = Figures("h", [0])
    figures.began(os.getpgid(0))  # this process's group stands in for the job's
    t = figures.started_at or 0.0
    figures.ended_at = t + 10
    figures.add([(0, {"at": t + 1, "memory_used_mb": 8000, "utilization_pct": 10,
                      "processes": [[os.getpid(), 1200], [2**22 + 1, 6000]]})])
    assert figures.result() == (1200, 10.0)


def test_figures_without_readings_are_none():
    figures = Figures("h", [0])
    figures.add([(0, {"at": time.time(), "memory_used_mb": 1, "utilization_pct": 1})])
    assert figures.result() == (None, None)


# -- the dashboard --------------------------------------------------------------------------

def test_dashboard_shows_the_report_and_its_api_answers_it(settings, local, recorded):
    from app.dashboard import create_app
    from tests.support.dashboard_http import dashboard_client

    now = time.time()
    with recorded.session() as session:
        session.add(_attempt(11, owner="dave", project="vision", start=now - 60, seconds=30,
                             gpus=2, peak=2500, util=42.0))
    with dashboard_client(create_app(settings, local)) as http:
        answer = http.get("/api/report", params={"since": "1h", "by": "project"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["groups"] == call_local(
            recorded, "report", {"since": "1h", "by": "project"})["groups"]
        assert answer.json()["groups"]["vision"]["gpu_seconds"] == 60
        assert http.get("/api/report", params={"by": "host"}).status_code == 422
        page = http.get("/usage", params={"since": "1h", "by": "project"})
        assert page.status_code == 200
        assert "vision" in page.text and "2500 MiB" in page.text and "42%" in page.text
        fragment = http.get("/partials/usage", params={"by": "user"})
        assert "dave" in fragment.text
        assert http.get("/usage", params={"since": "soon"}).status_code == 400


def test_nvml_process_records_become_pid_and_megabytes():
    from types import SimpleNamespace

    from scheduler.worker.monitor import _process_memory

    records = [SimpleNamespace(pid=11, usedGpuMemory=3 * 2**30),
               SimpleNamespace(pid=12, usedGpuMemory=None),  # the driver does not say
               SimpleNamespace(pid=13, usedGpuMemory=2**64 - 1),  # NVML's NOT_AVAILABLE
               object()]
    assert _process_memory(records) == [[11, 3072], [12, None], [13, None]]
