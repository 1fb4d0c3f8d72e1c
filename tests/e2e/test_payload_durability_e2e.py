"""A launch's payload is durable: the database keeps it with the launch, Redis only caches it.

Real Redis, a real database and real workers: Redis losing payload keys before the
replicas run, a remote launch whose answer never reaches its client, a launch whose
transaction fails in the database, and a routing failure after the commit."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from app.client import Client
from app.core.errors import GpuqError, OperationTimeout
from app.core.keys import CONTROL_QUEUE
from app.core.payloads import store
from app.store.models import Job, Launch, Payload
from tests.support.servers import processes_with, until

pytestmark = pytest.mark.e2e


def square(x: int) -> int:
    return x * x


def _gate(client: Client, path: Path) -> int:
    """A job that ends (SUCCEEDED) once `path` exists: what waits behind it stays PENDING."""
    return client.submit(f"while [ ! -e {path} ]; do sleep 0.2; done", gpus=1,
                         name=f"gate {path.name}").id


def _launch_named(client: Client, name: str) -> tuple[int, list[int]] | None:
    with Session(client.rt.engine) as session:
        launch_id = session.exec(select(Launch.id).where(col(Launch.name) == name)).first()
        if launch_id is None:
            return None
        ids = list(session.exec(select(Job.id).where(col(Job.launch_id) == launch_id)
                                .order_by(col(Job.rank))))
    return launch_id, [i for i in ids if i is not None]


def _payload_rows(client: Client) -> list[str]:
    with Session(client.rt.engine) as session:
        return list(session.exec(select(Payload.key)))


def _statuses(client: Client, ids: list[int], timeout_s: float = 90) -> list[str]:
    return [row["status"] for row in client.wait(ids, timeout_s=timeout_s)]


@contextlib.contextmanager
def refused_by_the_database(engine: Engine, name: str, event: str, table: str,
                            condition: str | None = None) -> Iterator[None]:
    """A trigger that makes the database itself refuse `event` on `table`: a real database
    error, raised in whichever process writes."""
    when = f" WHEN ({condition})" if condition else ""
    if engine.dialect.name == "sqlite":
        create = [f"CREATE TRIGGER {name} BEFORE {event} ON {table} FOR EACH ROW{when} "
                  "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"]
        drop = [f"DROP TRIGGER {name}"]
    else:
        create = [f"CREATE FUNCTION {name}() RETURNS trigger AS $$ BEGIN "
                  "RAISE EXCEPTION 'refused by the test'; END $$ LANGUAGE plpgsql",
                  f"CREATE TRIGGER {name} BEFORE {event} ON {table} FOR EACH ROW{when} "
                  f"EXECUTE FUNCTION {name}()"]
        drop = [f"DROP TRIGGER {name} ON {table}", f"DROP FUNCTION {name}()"]
    with engine.begin() as conn:
        for statement in create:
            conn.execute(text(statement))
    try:
        yield
    finally:
        with engine.begin() as conn:
            for statement in drop:
                conn.execute(text(statement))


# -- Redis loses the payload: the database still has it -------------------------------------

def test_a_launch_runs_after_redis_lost_its_payload_key(client: Client, tmp_path: Path):
    gate = tmp_path / "open"
    blocker = _gate(client, gate)
    handle = client.launch("echo rank {rank} of {num_jobs} token=$TOKEN", num_jobs=3,
                           after=[blocker], name="lost key", secrets={"TOKEN": "s3cret"})
    key = _launch_payload_key(client, handle.id)
    # Given the launch's replicas wait, and Redis loses the payload meanwhile
    assert client.rt.redis.delete(key) == 1
    # When they are dispatched
    gate.touch()
    # Then they run with their command, rank and secret, as if nothing were lost
    assert _statuses(client, handle.job_ids) == ["SUCCEEDED"] * 3
    assert [job.logs().splitlines()[-1] for job in handle.jobs] == [
        f"rank {r} of 3 token=s3cret" for r in range(3)]
    # and the payload goes, from both places, with the last replica
    until(lambda: not client.rt.redis.exists(key) and key not in _payload_rows(client))


def test_launches_run_after_redis_lost_every_payload(client: Client, tmp_path: Path):
    gate = tmp_path / "open"
    blocker = _gate(client, gate)
    mapped = client.map(square, [2, 3, 4], after=[blocker], name="lost all: map")
    swept = client.launch("echo lr", rank_args=[["0.1"], ["0.01"]], after=[blocker],
                          name="lost all: sweep")
    # Given Redis loses every payload it held (as a restart without persistence would)
    lost = list(client.rt.redis.scan_iter("gpuq:payload:*"))
    assert len(lost) >= 2
    client.rt.redis.delete(*lost)
    gate.touch()
    # Then every replica still gets its own call or arguments
    assert mapped.results(timeout_s=90) == [4, 9, 16]
    assert _statuses(client, swept.job_ids) == ["SUCCEEDED"] * 2
    assert [job.logs().splitlines()[-1] for job in swept.jobs] == ["lr 0.1", "lr 0.01"]


def _launch_payload_key(client: Client, launch_id: int) -> str:
    with Session(client.rt.engine) as session:
        launch = session.get(Launch, launch_id)
        assert launch is not None and launch.payload_key
        return launch.payload_key


# -- the client does not hear back: what was accepted keeps its payload ----------------------

def test_a_remote_launch_whose_answer_times_out_still_runs(client: Client, stack_settings):
    impatient = Client(stack_settings.model_copy(update={"op_timeout_s": 2}), "remote")
    # The control worker frozen, so the client surely gives up before any answer
    frozen = processes_with(f"control@{stack_settings.hostname}")
    assert frozen
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        # Given a remote launch whose client gives up before the control worker answers
        with pytest.raises(OperationTimeout):
            impatient.launch("echo late {rank}", num_jobs=2, gpus=0, name="timed out")
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        impatient.close()
    # When the control worker accepts it all the same
    _, ids = until(lambda: _launch_named(client, "timed out"), timeout_s=60)
    # Then its replicas have their payload and run
    assert _statuses(client, ids) == ["SUCCEEDED"] * 2
    assert [client.job(i).logs().splitlines()[-1] for i in ids] == ["late 0", "late 1"]


def test_a_launch_accepted_but_not_routed_is_reported_accepted_and_runs(client: Client):
    # Given the database refuses, after the launch's commit, to start any job
    with refused_by_the_database(client.rt.engine, "gpuq_test_no_start", "UPDATE", "jobs",
                                 "NEW.state = 'STARTING'"):
        # When a launch is stored and its first dispatch pass fails
        handle = client.launch("echo routed later {rank}", num_jobs=2, gpus=0,
                               name="not routed")
        # Then the launch is reported as what it is: accepted
        assert len(handle.job_ids) == 2
    # and once the database lets jobs start, its replicas run with their payload
    assert _statuses(client, handle.job_ids) == ["SUCCEEDED"] * 2


# -- the database refuses the launch: nothing accepted, nothing left behind ------------------

def test_a_launch_refused_by_the_database_leaves_no_payload(client: Client):
    before = _payload_rows(client)
    with refused_by_the_database(client.rt.engine, "gpuq_test_no_launch", "INSERT",
                                 "launches"), pytest.raises(Exception, match="refused by the test"):
        client.launch("echo never {rank}", num_jobs=2, name="refused", secrets={"T": "x"})
    assert _launch_named(client, "refused") is None
    assert list(client.rt.redis.scan_iter("gpuq:payload:*")) == []
    assert _payload_rows(client) == before


def test_a_launch_refused_after_its_client_went_away_leaves_no_payload(client: Client,
                                                                       stack_settings):
    """The refused launch's payload is removed where the refusal happens, in the control
    worker: a client that died after sending (SIGKILL, a closed laptop) cleans nothing."""
    s = stack_settings
    key = store(client.rt.redis, {"kind": "command", "command": "echo never", "rank_args": None},
                s.payload_ttl_s, s.max_payload_bytes, secret=s.secret)
    spec = {"command": "echo never", "name": "refused remotely", "payload_key": key}
    with refused_by_the_database(client.rt.engine, "gpuq_test_no_launch", "INSERT",
                                 "launches"):
        # Sent as the client sends it; nobody is left to act on the answer.
        result = client.rt.celery.send_task("gpuq.op", args=["launch", {
            "spec": spec, "num_jobs": 2}], queue=CONTROL_QUEUE)
        outcome = result.get(timeout=60, propagate=False)
        result.forget()
    assert "refused by the test" in str(outcome)
    assert not client.rt.redis.exists(key)
    assert _launch_named(client, "refused remotely") is None
    assert key not in _payload_rows(client)


def test_a_launch_naming_a_payload_redis_does_not_hold_is_refused(client: Client):
    before = client.call("queue")["total"]
    with pytest.raises(GpuqError, match="not in Redis"):
        client.call("launch", spec={"command": "x", "payload_key":
                                    "gpuq:payload:launch:" + os.urandom(8).hex()}, num_jobs=2)
    with pytest.raises(GpuqError, match="not a payload key"):
        client.call("launch", spec={"command": "x", "payload_key": "gpuq:hosts"}, num_jobs=2)
    assert client.call("queue")["total"] == before
