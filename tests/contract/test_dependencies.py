"""Jobs that run after others, on real Redis and a real database: the dispatcher passes a
waiting job over until every job it runs after has SUCCEEDED, and a job whose dependency
did not succeed is cancelled, since it could never start."""

from __future__ import annotations

import time

import pytest
from sqlmodel import Session, col, update

from app.core import keys
from app.core.errors import InvalidJobSpec, JobNotFound
from app.stack.host import register_host
from app.store.jobs import create_jobs
from app.store.models import Job
from app.store.spec import JobSpec
from scheduler.dispatch.allocator import Dispatcher
from scheduler.dispatch.reconcile import reconcile
from scheduler.worker.attempt import run_attempt
from scheduler.worker.monitor import FakeProvider


@pytest.fixture
def host(rt):
    """A host of two GPUs whose workers are alive (the test runs their attempts itself)."""
    register_host(rt, FakeProvider(2), "h")
    for i in range(2):
        rt.redis.set(keys.alive("h", i), 1, ex=60)
    return Dispatcher(rt)


def finish(rt, job) -> str:
    with Session(rt.engine) as session:
        attempt = session.get(Job, job.id).attempt
    return run_attempt(rt, job.id, attempt)


def test_a_job_after_another_waits_with_a_free_gpu_until_it_succeeds(rt, local, host):
    first = local.submit("true # first")
    second = local.submit("true # second", after=[first.id])
    host.dispatch()
    # A GPU is free, yet the second job waits for the first
    assert (first.status, second.status) == ("STARTING", "PENDING")
    assert second.row()["reason"] == f"after jobs {first.id}"
    assert finish(rt, first) == "SUCCEEDED"
    host.dispatch()
    assert second.status == "STARTING"
    assert finish(rt, second) == "SUCCEEDED"


def test_a_job_after_several_waits_for_all_of_them(rt, local, host):
    a, b = local.submit("true # a"), local.submit("true # b")
    last = local.submit("true # last", after=[a.id, b.id])
    host.dispatch()
    finish(rt, a)
    host.dispatch()
    assert last.status == "PENDING", "b has not ended"
    finish(rt, b)
    host.dispatch()
    assert last.status == "STARTING"


def test_dependents_of_a_failed_job_are_cancelled_down_the_chain(rt, local, host):
    failing = local.submit("exit 3")
    middle = local.submit("true # middle", after=[failing.id])
    end = local.submit("true # end", after=[middle.id])
    host.dispatch()
    assert finish(rt, failing) == "FAILED"
    middle_row, end_row = middle.row(), end.row()
    assert middle_row["status"] == end_row["status"] == "CANCELLED"
    assert middle_row["reason"] == f"job {failing.id} it runs after ended FAILED"
    assert end_row["reason"] == f"job {middle.id} it runs after ended CANCELLED"


def test_cancelling_a_launch_cancels_the_job_after_it(rt, local, host):
    sweep = local.launch("sleep 100", num_jobs=3)
    report = local.submit("true # report", after=sweep.job_ids)
    sweep.cancel()
    assert report.status == "CANCELLED"


def test_every_replica_of_a_launch_after_a_job_waits_for_it(rt, local, host):
    first = local.submit("true # before the sweep")
    sweep = local.launch("true", num_jobs=3, after=[first.id])
    host.dispatch()
    assert {r["status"] for r in local.rows(sweep.job_ids)} == {"PENDING"}
    finish(rt, first)
    host.dispatch()
    assert sorted(r["status"] for r in local.rows(sweep.job_ids)) == [
        "PENDING", "STARTING", "STARTING"], "two GPUs, three replicas, all released"


def test_a_job_after_one_that_already_succeeded_starts_at_once(rt, local, host):
    done = local.submit("true # done")
    host.dispatch()
    finish(rt, done)
    follower = local.submit("true # follower", after=[done.id])
    assert follower.status == "STARTING"
    assert local.call("job", job_id=follower.id)["after"] == [done.id]


def test_after_a_job_that_cannot_succeed_or_does_not_exist_is_refused(rt, local, host):
    failed = local.submit("exit 1")
    host.dispatch()
    finish(rt, failed)
    before = local.call("queue")["total"]
    with pytest.raises(InvalidJobSpec, match=f"job {failed.id} ended FAILED.*drop {failed.id}"):
        local.submit("true", after=[failed.id])
    with pytest.raises(JobNotFound, match="--after names no such job: 999"):
        local.submit("true", after=[999])
    assert local.call("queue")["total"] == before, "nothing stored"


@pytest.mark.parametrize("backend", ["slurm", "aws_batch", "kubernetes", "process"])
def test_batch_backends_refuse_dependencies_naming_the_fix(local, backend):
    with pytest.raises(InvalidJobSpec, match=f"the {backend} backend takes no dependencies "
                       r"\(--after\)"):
        local.submit("true", backend=backend, after=[1])


def _after_a_job_that_ends_unseen(rt, local, state: str, ended_at: float | None = None):
    """A job waiting on another that then ends `state` (at `ended_at`) without the
    transition that settles its dependents (as when a submission races the ending); return
    the waiting job."""
    first = local.submit(f"sleep 100 # first, ends {state} unseen at {ended_at}")
    second = local.submit(f"true # after one that ends {state} at {ended_at}",
                          after=[first.id])
    with Session(rt.engine) as session:
        session.execute(update(Job).where(col(Job.id) == first.id).values(
            state=state, ended_at=ended_at))
        session.commit()
    return second


def test_reconcile_looks_only_at_dependents_of_jobs_that_ended_since_its_last_tick(
        rt, local, host):
    # Given a reconciler that ticked once, and two waiting jobs whose dependencies ended
    # unseen: one an hour before that tick, one now
    reconcile(rt)
    before = _after_a_job_that_ends_unseen(rt, local, "SUCCEEDED", time.time() - 3600)
    since = _after_a_job_that_ends_unseen(rt, local, "SUCCEEDED", time.time())
    # When it ticks again
    reconcile(rt)
    # Then it released the one whose dependency ended since, and read nothing older: its
    # cost is that of the recent endings, not of every waiting job
    with Session(rt.engine) as session:
        assert session.get(Job, since.id).waiting is False
        assert session.get(Job, before.id).waiting is True


def test_reconcile_releases_a_job_whose_dependency_ended_unseen(rt, local, host):
    # Given a waiting job whose dependency ended without the transition that settles it
    # (a submission that raced the ending)
    second = _after_a_job_that_ends_unseen(rt, local, "SUCCEEDED")
    host.dispatch()
    assert second.status == "PENDING"
    # When reconciliation runs, then the job is released and routed
    reconcile(rt)
    assert second.status == "STARTING"


def test_reconcile_cancels_a_job_whose_dependency_failed_unseen(rt, local, host):
    second = _after_a_job_that_ends_unseen(rt, local, "FAILED")
    reconcile(rt)
    row = second.row()
    assert (row["status"], row["reason"]) == ("CANCELLED", "a job it runs after did not succeed")


def test_a_chain_of_a_thousand_is_cancelled_when_its_first_job_fails(rt, local, host):
    # Given a chain of 1,000 jobs, each after the one before
    failing = local.submit("exit 3 # head of the chain")
    chain, before = [], failing.id
    with Session(rt.engine) as session:
        for n in range(1_000):
            spec = JobSpec(command=f"true # link {n}", after=[before])
            before = create_jobs(session, spec, 1, launch=False)[1][0]
            chain.append(before)
        session.commit()
    host.dispatch()
    # When its first job fails, then every job of the chain is cancelled, in the ending
    # job's own transaction, without error
    assert finish(rt, failing) == "FAILED"
    rows = local.rows(chain)
    assert {r["status"] for r in rows} == {"CANCELLED"}
    by_id = {r["id"]: r for r in rows}
    assert by_id[chain[0]]["reason"] == f"job {failing.id} it runs after ended FAILED"
    assert by_id[chain[-1]]["reason"] == f"job {chain[-2]} it runs after ended CANCELLED"
