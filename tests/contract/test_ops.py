"""The operations registry in process: answers, and bad input that changes nothing."""

from __future__ import annotations

import pytest
from sqlalchemy import update
from sqlmodel import col

from app.core.errors import (
    DuplicateJob,
    GpuqError,
    InvalidJobSpec,
    JobNotFound,
    LaunchNotFound,
    UnknownOperation,
)
from app.core.states import JobState
from app.ops.registry import MODULES, call_local, load_all
from app.store.models import Job


def test_registry_holds_every_operation():
    assert {"submit", "launch", "queue", "cancel", "logs", "status", "job", "launches",
            "dispatch"} <= set(load_all()) == set(MODULES)


def test_unknown_operation_lists_the_known_ones(rt):
    with pytest.raises(UnknownOperation, match="known: add_project, cancel"):
        call_local(rt, "explode", {})


def test_launch_stores_every_replica_pending_with_ranks(rt, local):
    client = local
    handle = client.launch(["python", "train.py", "--lr", "3e-4"], num_jobs=5, name="sweep")
    rows = client.call("queue", launch_id=handle.id)["jobs"]
    assert [r["rank"] for r in rows] == [0, 1, 2, 3, 4]
    assert {r["status"] for r in rows} == {"PENDING"}
    assert {r["command"] for r in rows} == {"python train.py --lr 3e-4"}
    assert handle.job_ids == list(range(handle.job_ids[0], handle.job_ids[0] + 5))
    assert handle.counts() == {"PENDING": 5}


@pytest.mark.parametrize(("spec", "message"), [
    ({"command": "  "}, "command is empty"),
    ({"command": "true", "gpus": -1}, "gpus"),
    ({"command": "true", "gpus": "two"}, "gpus"),
    ({"command": "true", "backend": "mainframe"}, "unknown backend 'mainframe'; choose one of"),
    ({"command": "true", "colour": "red"}, "colour"),
])
def test_bad_spec_is_refused_and_nothing_is_stored(rt, spec, message, local):
    client = local
    kept = client.submit("echo kept")
    with pytest.raises(InvalidJobSpec, match=message):
        client.call("submit", spec=spec)
    assert client.call("queue")["total"] == 1
    assert kept.status == "PENDING"


def test_cancel_of_an_unknown_id_changes_nothing(rt, local):
    client = local
    kept = client.submit("echo kept")
    with pytest.raises(JobNotFound, match="no job with id 999"):
        client.call("cancel", ids=[kept.id, 999])
    assert kept.status == "PENDING"


def test_cancelled_pending_jobs_end_cancelled_with_an_event(rt, local):
    client = local
    handle = client.launch("sleep 1", num_jobs=3)
    out = handle.cancel()
    assert out == {"cancelled": handle.job_ids, "cancelling": []}
    job = client.call("job", job_id=handle.job_ids[0])
    assert job["status"] == "CANCELLED"
    assert [(e["from"], e["to"]) for e in job["events"]] == [
        (None, "PENDING"), ("PENDING", "CANCELLED")]


@pytest.mark.parametrize(("op", "kwargs", "error"), [
    ("logs", {"job_id": 12345}, JobNotFound),
    ("job", {"job_id": 12345}, JobNotFound),
    ("launches", {"launch_id": 12345}, LaunchNotFound),
    ("cancel", {"launch_id": 12345}, LaunchNotFound),
    ("cancel", {}, InvalidJobSpec),
    ("queue", {"status": "SLEEPING"}, InvalidJobSpec),
    ("queue", {"limit": 0}, InvalidJobSpec),
    ("launch", {"spec": {"command": "true"}, "num_jobs": 0}, InvalidJobSpec),
])
def test_bad_requests_get_a_clear_error(rt, op, kwargs, error):
    with pytest.raises(error) as caught:
        call_local(rt, op, kwargs)
    assert isinstance(caught.value, GpuqError) and str(caught.value)


def test_identical_job_not_yet_ended_is_refused_with_its_id(local):
    first = local.submit("python train.py", env={"LR": "3e-4"}, gpus=2)
    with pytest.raises(DuplicateJob, match=f"identical job {first.id} is already PENDING"):
        local.submit("python train.py", env={"LR": "3e-4"}, gpus=2)
    other_env = local.submit("python train.py", env={"LR": "1e-3"}, gpus=2)
    forced = local.submit("python train.py", env={"LR": "3e-4"}, gpus=2, allow_duplicate=True)
    assert len({first.id, other_env.id, forced.id}) == 3
    assert local.call("queue")["total"] == 3


def test_identical_job_is_accepted_again_once_the_first_ended(local):
    first = local.submit("python eval.py")
    first.cancel()
    again = local.submit("python eval.py")
    assert again.id != first.id and again.status == "PENDING"


def test_handles_give_typed_rows_the_operations_built(local):
    job = local.submit("echo typed", gpus=1, name="typed", env={"A": "1"})
    info = job.info()
    assert (info.id, info.name, info.status, info.env) == (job.id, "typed", "PENDING",
                                                           {"A": "1"})
    assert [e.to for e in info.events] == ["PENDING"]
    launch = local.launch("echo {rank}", 3, gpus=1)
    row = launch.info()
    assert (row.id, row.num_jobs, row.counts, row.done) == (launch.id, 3, {"PENDING": 3}, 0)


def test_cancelling_an_ended_job_names_its_state(rt, local):
    done = local.submit("echo done")
    waiting = local.submit("echo waiting")
    with rt.session() as session:  # as a worker records a job that exited 0
        session.execute(update(Job).where(col(Job.id) == done.id).values(
            state=JobState.SUCCEEDED.value, ended_at=1.0))
        session.commit()
    out = local.call("cancel", ids=[done.id, waiting.id])
    assert out == {"cancelled": [waiting.id], "cancelling": [],
                   "ended": {str(done.id): "SUCCEEDED"}}
    assert done.status == "SUCCEEDED"
