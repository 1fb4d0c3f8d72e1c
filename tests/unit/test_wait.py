"""`gpuq wait` and the client's waits: every job named or every replica of a launch, however
many there are, and a refusal for what does not exist. The states are set in the database
directly: what is under test is the waiting, not the running of 10,001 processes."""

from __future__ import annotations

import pytest
from sqlalchemy import update
from sqlmodel import col
from typer.testing import CliRunner

from app.cli.main import cli
from app.core.errors import JobNotFound, LaunchNotFound
from app.core.states import JobState
from app.ops.read import MAX_PAGE
from app.store.counts import recount
from app.store.models import Job

REPLICAS = MAX_PAGE + 1  # one more than a page of the queue


def end(rt, state: JobState, *where) -> None:
    """Set the state by hand, then count the jobs again (as `gpuq db recount` does)."""
    with rt.session() as session:
        session.execute(update(Job).where(*where).values(state=state.value, exit_code=(
            0 if state is JobState.SUCCEEDED else 1)))
        recount(session)


@pytest.fixture
def big_launch(local, rt):
    """A launch of 10,001 replicas, all SUCCEEDED but the last one (rank 10,000): FAILED."""
    handle = local.launch("true {rank}", REPLICAS, gpus=1)
    last = handle.job_ids[-1]
    end(rt, JobState.SUCCEEDED, col(Job.launch_id) == handle.id, col(Job.id) != last)
    end(rt, JobState.FAILED, col(Job.id) == last)
    return handle


def test_wait_on_a_launch_of_10001_whose_last_replica_fails_exits_1(big_launch, settings):
    result = CliRunner().invoke(cli, ["wait", "--launch", str(big_launch.id), "--timeout", "60"],
                                env=settings.as_environment())
    assert result.exit_code == 1, result.output
    assert f"job {big_launch.job_ids[-1]}: FAILED (exit 1)" in result.output


def test_wait_on_10001_ids_whose_last_fails_exits_1(big_launch, settings):
    ids = [str(i) for i in big_launch.job_ids]
    result = CliRunner().invoke(cli, ["wait", *ids, "--timeout", "60"],
                                env=settings.as_environment())
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"job {big_launch.job_ids[-1]}: FAILED (exit 1)"


def test_a_launch_handle_waits_on_every_replica_of_a_launch_over_a_page(big_launch, local):
    rows = big_launch.wait(timeout_s=60)
    assert [row["rank"] for row in rows] == list(range(REPLICAS))
    assert [row["status"] for row in rows[-2:]] == ["SUCCEEDED", "FAILED"]
    assert [row["id"] for row in local.wait(big_launch.job_ids, 60)] == big_launch.job_ids


def test_a_launch_still_running_past_its_last_page_is_waited_for(local, rt, settings):
    handle = local.launch("true {rank}", 3, gpus=1)
    end(rt, JobState.SUCCEEDED, col(Job.launch_id) == handle.id, col(Job.rank) < 2)
    result = CliRunner().invoke(cli, ["wait", "--launch", str(handle.id), "--timeout", "1"],
                                env=settings.as_environment())
    assert result.exit_code == 1
    assert "1 of 3 replicas still not ended after 1.0s" in result.output
    with pytest.raises(TimeoutError):
        handle.wait(timeout_s=0.5)


def test_waiting_on_ids_that_do_not_exist_is_refused_naming_them(local, rt):
    job = local.submit("true", gpus=1)
    end(rt, JobState.SUCCEEDED, col(Job.id) == job.id)
    with pytest.raises(JobNotFound, match=f"no job with id 99998, 99999, {2**64};"):
        local.wait([job.id, 99999, 99998, 2**64])
    with pytest.raises(LaunchNotFound, match="no launch with id 424242"):
        local.wait_launch(424242)
    assert local.wait([job.id, job.id]) == [job.row(), job.row()]
