"""Finished jobs are forgotten after GPUQ_KEEP_FINISHED_DAYS, with their events, edges,
launches, payloads and files; nothing that runs, waits or ended recently is touched."""

from __future__ import annotations

import os
import time

import pytest
from sqlalchemy import func, update
from sqlmodel import col, select

from app.client import Client
from app.core.paths import JobPaths
from app.core.settings import Settings
from app.runtime import Runtime
from app.store.counts import recount
from app.store.models import Job, JobDependency, JobEvent, Launch, Payload
from app.store.retention import sweep_files
from scheduler.dispatch.reconcile import prune_finished_jobs
from tests.support.servers import EXTERNAL_DB, Stack, clean_servers, until

DAY = 86400.0


def _end(rt: Runtime, ids: list[int], state: str, days_ago: float) -> None:
    with rt.session() as session:
        session.execute(update(Job).where(col(Job.id).in_(ids))
                        .values(state=state, ended_at=time.time() - days_ago * DAY))
        recount(session)  # as `gpuq db recount` after a hand edit
        session.commit()


def _count(rt: Runtime, model: type, *where: object) -> int:
    with rt.session() as session:
        return session.exec(select(func.count()).select_from(model).where(*where)).one()


def test_jobs_that_ended_before_the_cut_off_go_with_all_that_hangs_on_them(
        rt: Runtime, local: Client):
    # Launches with per-rank arguments: their payload is stored once for all replicas
    gone_launch = local.launch("echo gone", rank_args=[[0], [1], [2]])
    half_launch = local.launch("echo half", rank_args=[[0], [1]])
    first = local.submit("echo first", allow_duplicate=True).id
    second = local.submit("echo second", after=[first], allow_duplicate=True).id
    running = local.submit("echo running", allow_duplicate=True).id
    pending = local.submit("echo pending", allow_duplicate=True).id
    _end(rt, gone_launch.job_ids, "SUCCEEDED", days_ago=40)
    _end(rt, [half_launch.job_ids[0], first], "FAILED", days_ago=31)
    _end(rt, [second], "CANCELLED", days_ago=29)  # inside the 30 days: kept
    with rt.session() as session:
        session.execute(update(Job).where(col(Job.id) == running).values(state="RUNNING"))
        session.commit()
        gone_key = session.exec(select(Launch.payload_key)
                                .where(Launch.id == gone_launch.id)).one()
        half_key = session.exec(select(Launch.payload_key)
                                .where(Launch.id == half_launch.id)).one()
    assert gone_key and half_key and rt.redis.exists(gone_key)
    events_kept = _count(rt, JobEvent, col(JobEvent.job_id).in_(
        [half_launch.job_ids[1], second, running, pending]))

    assert prune_finished_jobs(rt) == 5

    with rt.session() as session:
        ids = set(session.exec(select(Job.id)).all())
    assert ids == {half_launch.job_ids[1], second, running, pending}
    assert _count(rt, JobEvent, col(JobEvent.job_id).not_in(ids)) == 0
    assert _count(rt, JobEvent) == events_kept
    assert _count(rt, JobDependency) == 0  # second's edge to first went with first
    assert _count(rt, Launch, col(Launch.id) == gone_launch.id) == 0
    assert _count(rt, Launch, col(Launch.id) == half_launch.id) == 1
    assert _count(rt, Payload, col(Payload.key) == gone_key) == 0
    assert not rt.redis.exists(gone_key)
    assert _count(rt, Payload, col(Payload.key) == half_key) == 1  # a replica still uses it

    assert prune_finished_jobs(rt) == 0  # nothing left to prune


def test_keep_finished_days_0_keeps_everything(rt: Runtime, local: Client):
    job = local.submit("echo old", allow_duplicate=True).id
    _end(rt, [job], "SUCCEEDED", days_ago=4000)
    rt.settings = rt.settings.model_copy(update={"keep_finished_days": 0})
    assert prune_finished_jobs(rt) == 0
    assert _count(rt, Job, col(Job.id) == job) == 1


def test_a_host_sweeps_the_files_of_pruned_jobs_and_no_others(rt: Runtime, local: Client):
    kept = local.submit("echo kept", allow_duplicate=True).id
    pruned = kept + 1000  # an id the database no longer has
    young = kept + 1001  # no row, but written inside the retention period: left alone
    home = rt.settings.home
    old = time.time() - 2 * DAY
    for job_id in (kept, pruned, young):
        paths = JobPaths(home, job_id)
        paths.logs_dir.mkdir(parents=True, exist_ok=True)
        paths.log.write_text("output\n")
        paths.tmux_script.write_text("exec true\n")
        paths.run_dir.mkdir(parents=True)
        paths.call_file.write_bytes(b"call")
        if job_id != young:
            for path in (paths.log, paths.tmux_script, paths.run_dir):
                os.utime(path, (old, old))
    (home / "logs" / "notes.txt").write_text("not a job's\n")

    assert sweep_files(rt.engine, home, older_than_s=DAY) == 1

    assert JobPaths(home, kept).log.exists() and JobPaths(home, kept).run_dir.exists()
    assert not JobPaths(home, pruned).log.exists()
    assert not JobPaths(home, pruned).tmux_script.exists()
    assert not JobPaths(home, pruned).run_dir.exists()
    assert JobPaths(home, young).log.exists() and JobPaths(home, young).run_dir.exists()
    assert (home / "logs" / "notes.txt").exists()


def test_gpuq_db_prune_deletes_what_ended_before_the_days_given(rt: Runtime, local: Client,
                                                               settings):
    from tests.e2e.test_cli_e2e import gpuq

    old, recent = (local.submit(f"echo {n}", allow_duplicate=True).id for n in ("a", "b"))
    _end(rt, [old], "SUCCEEDED", days_ago=3)
    _end(rt, [recent], "SUCCEEDED", days_ago=1)
    out = gpuq(settings, "db", "prune", "--older-than-days", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "pruned 1 jobs that ended over 2 days ago"
    assert _count(rt, Job, col(Job.id) == old) == 0
    assert _count(rt, Job, col(Job.id) == recent) == 1


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_stack_forgets_a_finished_job_and_its_log_after_the_retention_period(
        tmp_path_factory: pytest.TempPathFactory, redis_url: str):
    """Real beat, control worker and `gpuq worker`: the row goes by the periodic prune, the
    log by the host's sweep."""
    home = tmp_path_factory.mktemp("retention-home")
    clean_servers(redis_url)
    settings = Settings(home=home, redis_url=redis_url, database_url=EXTERNAL_DB,
                        hostname="e2e-retention", fake_gpus=1, cpu_slots=1, heartbeat_s=1,
                        kill_grace_s=1, keep_finished_days=4 / 86400, prune_interval_s=1,
                        _env_file=None)
    with Stack(settings, home).up(gpus=1) as stack:
        client = Client(stack.settings, "local")
        try:
            job = client.submit("echo kept for a while", gpus=1)
            running = client.submit("sleep 60", gpus=0)
            assert job.wait(timeout_s=120) == "SUCCEEDED"
            log = JobPaths(home, job.id).log
            assert log.exists()
            until(lambda: not client.rows([job.id]), timeout_s=90)
            until(lambda: not log.exists(), timeout_s=90)
            assert client.rows([running.id])[0]["status"] in ("STARTING", "RUNNING")
            running.cancel()
        finally:
            client.close()


def test_a_job_no_host_can_hold_is_dated_when_it_fails_and_pruned_after_the_period(
        rt: Runtime, local: Client):
    from app.store import cluster

    # Given a cluster whose largest host has 2 GPUs, and a job that asks for 4
    cluster.register_host(rt.redis, "h1", {0: {"name": "fake"}, 1: {"name": "fake"}})
    job = local.submit("python big.py", gpus=4).id
    # Then it ended FAILED_NO_RESOURCE with its end dated
    with rt.session() as session:
        state, ended_at = session.exec(select(Job.state, Job.ended_at)
                                       .where(Job.id == job)).one()
    assert state == "FAILED_NO_RESOURCE"
    assert ended_at is not None and abs(ended_at - time.time()) < 600
    # And retention prunes it once it ended before the cut-off
    with rt.session() as session:
        session.execute(update(Job).where(col(Job.id) == job)
                        .values(ended_at=time.time() - 31 * DAY))
        session.commit()
    assert prune_finished_jobs(rt) == 1


@pytest.mark.parametrize("target", ["CANCELLED", "FAILED_PRECHECK", "FAILED_NO_RESOURCE"])
def test_every_end_straight_from_pending_is_dated(rt: Runtime, target: str):
    from app.core.states import JobState
    from app.store.jobs import create_jobs, transition
    from app.store.spec import JobSpec

    with rt.session() as session:
        (job,) = create_jobs(session, JobSpec(command="true"), 1, launch=False)[1]
        assert transition(session, JobState(target), "why", [col(Job.id) == job]) == [job]
        session.commit()
        assert session.exec(select(Job.ended_at).where(Job.id == job)).one() is not None


def _files(paths: JobPaths) -> list:
    paths.logs_dir.mkdir(parents=True, exist_ok=True)
    paths.log.write_text("the old job's output\n")
    paths.tmux_script.write_text("exec true\n")
    paths.tmux_exit.write_text("0\n")
    paths.run_dir.mkdir(parents=True)
    paths.call_file.write_bytes(b"call")
    return [paths.log, paths.tmux_script, paths.tmux_exit, paths.run_dir]


def test_pruning_deletes_the_files_of_the_pruned_jobs_on_its_host_at_once(rt: Runtime,
                                                                          local: Client):
    from app.core.paths import BatchStore

    # Given a local job and a batch job, both with their files here, and a batch launch
    # whose payload lies in its backend's store
    home = rt.settings.home
    old = local.submit("echo old", allow_duplicate=True).id
    batch = local.submit("echo batch", backend="process", allow_duplicate=True).id
    sweep = local.launch("echo {rank}", rank_args=[[0]], backend="process")
    kept = local.submit("echo kept", allow_duplicate=True).id
    with rt.session() as session:
        key = session.exec(select(Launch.payload_key).where(Launch.id == sweep.id)).one()
    store = BatchStore(home / "batch")
    local_files = _files(JobPaths(home, old))
    kept_files = _files(JobPaths(home, kept))
    batch_files = [store.results(None, batch), store.results(sweep.id, sweep.job_ids[0]),
                   store.payload(key)]
    for path in batch_files[:2]:
        path.mkdir(parents=True)
        (path / "0.pkl").write_bytes(b"envelope")
    batch_files[2].parent.mkdir(parents=True)
    batch_files[2].write_bytes(b"payload")
    JobPaths(home, batch).log.write_text("batch output\n")
    _end(rt, [old, batch, *sweep.job_ids], "SUCCEEDED", days_ago=40)
    # When retention prunes them
    assert prune_finished_jobs(rt) == 3
    # Then their files are gone at once, with no sweep; the kept job's are not
    for path in [*local_files, *batch_files, JobPaths(home, batch).log]:
        assert not path.exists(), path
    assert all(path.exists() for path in kept_files)
    # And a new job takes a new id: it never sees a pruned job's log
    _end(rt, [kept], "SUCCEEDED", days_ago=40)
    assert prune_finished_jobs(rt) == 1
    JobPaths(home, kept).logs_dir.mkdir(parents=True, exist_ok=True)
    new = local.submit("echo new", allow_duplicate=True).id
    assert new > kept and not JobPaths(home, new).log.exists()
