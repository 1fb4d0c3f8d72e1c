"""Backfill with reservations, against the real planner on real Redis and a real database: a
blocked job at the head gets GPUs and a start time from the running jobs' limits, and the
jobs behind it start now only where they delay it."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from sqlalchemy import update
from sqlmodel import col

from app.core import keys
from app.runtime import Runtime
from app.stack.host import register_host
from app.store.models import Job
from scheduler.dispatch.allocator import Dispatcher
from scheduler.planner.reservations import Reservation, loads
from scheduler.worker.monitor import FakeProvider


def _bring_up(rt: Runtime, host: str, count: int) -> None:
    """Register a host's GPUs and mark their workers alive, as `gpuq worker` does."""
    register_host(rt, FakeProvider(count), host)
    for i in range(count):
        rt.redis.set(keys.alive(host, i), 1, ex=600)


def _running_since(rt: Runtime, job_id: int, started_at: float) -> None:
    """The job RUNNING since `started_at`, as its worker writes it."""
    with rt.session() as session:
        session.execute(update(Job).where(col(Job.id) == job_id)
                        .values(state="RUNNING", started_at=started_at))


def _reservations(rt: Runtime) -> dict[int, Reservation]:
    return loads(rt.redis.get(keys.RESERVATIONS))  # type: ignore[arg-type]


def _a_2_gpu_job_waits_for_a_running_one(rt: Runtime, local, limit: str | None
                                         ) -> tuple[int, int, float]:
    """Two GPUs, one held by a job RUNNING for a minute (with `limit`), and a 2-GPU job of
    higher priority than what follows waiting for it: (running id, waiting id, started)."""
    _bring_up(rt, "h", 2)
    running = local.submit("sleep 1000 # holds one", priority=9,
                           **({"time": limit} if limit else {}))
    assert running.status == "STARTING"
    started = time.time() - 60
    _running_since(rt, running.id, started)
    big = local.submit("true # needs both", gpus=2, priority=5, time="1h")
    Dispatcher(rt).dispatch()
    assert big.status == "PENDING"
    return running.id, big.id, started


def test_the_reservations_start_is_the_running_jobs_end(rt, local):
    # Given a 2-GPU job waiting for a job that runs with a 10-minute limit
    _, big, started = _a_2_gpu_job_waits_for_a_running_one(rt, local, "10m")
    # Then it holds both GPUs from the running job's end by its limit
    found = _reservations(rt)[big]
    assert (found.host, found.gpus) == ("h", (0, 1))
    assert found.start is not None and abs(found.start - (started + 600)) < 1e-3


def test_a_short_job_backfills_onto_a_reserved_gpu_while_a_long_one_waits(rt, local):
    # Given a 2-GPU job that holds a reservation from the end of a job of 10 minutes
    _, big, _ = _a_2_gpu_job_waits_for_a_running_one(rt, local, "10m")
    # When a long job and a short one of lower priority come
    long = local.submit("true # longer than the gap", time="30m")
    short = local.submit("true # ends before the reservation", time="5m")
    Dispatcher(rt).dispatch()
    # Then the short one starts on the free GPU; the long one and the 2-GPU job wait
    assert short.status == "STARTING"
    assert (long.status, local.job(big).status) == ("PENDING", "PENDING")
    assert _reservations(rt)[big].gpus == (0, 1), "the reservation stands"


def test_a_job_without_a_limit_never_backfills_onto_reserved_gpus(rt, local):
    _, big, _ = _a_2_gpu_job_waits_for_a_running_one(rt, local, "10m")
    endless = local.submit("true # no limit")
    Dispatcher(rt).dispatch()
    assert endless.status == "PENDING"
    assert big in _reservations(rt)


def test_a_running_job_without_a_limit_keeps_the_gpus_set_aside(rt, local):
    # Given a 2-GPU job waiting for a job that runs without a limit: its start is unknown
    _, big, _ = _a_2_gpu_job_waits_for_a_running_one(rt, local, None)
    # When a short job comes
    short = local.submit("true # short", time="1m")
    Dispatcher(rt).dispatch()
    # Then the free GPU stays set aside for the 2-GPU job, as before backfill
    assert short.status == "PENDING"
    assert big not in _reservations(rt), "an unknown start is not kept between passes"


def test_why_names_the_reservation(rt, local):
    running, big, started = _a_2_gpu_job_waits_for_a_running_one(rt, local, "10m")
    reason = local.call("why", job_id=big)["reason"]
    at = time.strftime("%H:%M", time.localtime(started + 600))
    assert reason.endswith(f"reserved GPUs 0,1 on host h from {at} (job {running} ends by "
                           "then)"), reason


def test_the_reservation_holds_against_a_job_of_higher_priority_submitted_later(rt, local):
    # Given a 2-GPU job holding a reservation
    _, big, _ = _a_2_gpu_job_waits_for_a_running_one(rt, local, "10m")
    promised = _reservations(rt)[big].start
    # When a longer job of higher priority comes
    urgent = local.submit("true # urgent but long", priority=9, time="2h")
    Dispatcher(rt).dispatch()
    # Then it does not take the reserved GPU, and the promise stands
    assert urgent.status == "PENDING"
    assert _reservations(rt)[big].start == promised


def test_the_reservation_depth_bounds_the_jobs_reserved(rt, local, monkeypatch):
    monkeypatch.setattr(rt.settings, "backfill_reserve_depth", 1)
    _, big, _ = _a_2_gpu_job_waits_for_a_running_one(rt, local, "10m")
    second = local.submit("true # needs both too", gpus=2, priority=4, time="20m")
    Dispatcher(rt).dispatch()
    assert set(_reservations(rt)) == {big}
    assert second.status == "PENDING"


def test_a_reserved_job_shows_its_reservations_start_as_its_eta(rt, local):
    # Given a 2-GPU job reserved from the end of a job of 10 minutes, and one without a limit
    running, big, started = _a_2_gpu_job_waits_for_a_running_one(rt, local, "10m")
    # Then its row says when it will start, and on what
    row = local.job(big).row()
    expected = datetime.fromtimestamp(started + 600, UTC)
    assert row["eta_basis"] == "reservation"
    assert abs((datetime.fromisoformat(row["eta"]) - expected).total_seconds()) < 0.01
    # and a job not reached by a pass, or running, says nothing it does not know
    assert local.job(running).row()["eta"] is None


def test_a_job_waiting_on_a_job_without_a_limit_has_an_unknown_eta(rt, local):
    _, big, _ = _a_2_gpu_job_waits_for_a_running_one(rt, local, None)
    row = local.job(big).row()
    assert (row["eta"], row["eta_basis"]) == (None, "unknown")


def test_a_short_job_behind_many_long_ones_of_its_shape_still_backfills(rt, local):
    # Given a reserved free GPU, and 50 jobs too long for the gap queued before a short one
    _, big, _ = _a_2_gpu_job_waits_for_a_running_one(rt, local, "10m")
    local.launch("true # too long", num_jobs=50, time="30m")
    short = local.submit("true # fits the gap", time="5m")
    # When a pass runs
    Dispatcher(rt).dispatch()
    # Then the long ones are passed over and the short one starts
    assert short.status == "STARTING"
    assert local.job(big).status == "PENDING"
