"""A shared box through real worker processes on 4 fake GPUs: two users' jobs start in
fair-share order (equal weights alternate, a doubled weight gets about two starts to one),
and a user at a GPU limit never runs more, by the spans the jobs record themselves."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import col, select

from app.core.errors import UserExists
from app.core.identity import Actor
from app.core.settings import Settings
from app.ops.registry import call_local
from app.runtime import Runtime
from app.store import users
from app.store.models import Job, JobEvent
from tests.support.servers import EXTERNAL_DB, PREFLIGHT_FAKES, Stack, clean_servers, until

pytestmark = pytest.mark.e2e

GPUS = 4
JOBS_EACH = 40


@pytest.fixture(scope="module")
def stack_settings(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Settings:
    clean_servers(redis_url)
    return Settings(home=tmp_path_factory.mktemp("fair-home"), redis_url=redis_url,
                    database_url=EXTERNAL_DB, hostname="e2e-fair", fake_gpus=GPUS,
                    kill_grace_s=1, heartbeat_s=1, monitor_interval_s=0.5, cpu_slots=1,
                    preflight_commands=PREFLIGHT_FAKES, _env_file=None)


@pytest.fixture(scope="module")
def rt(stack_settings: Settings) -> Iterator[Runtime]:
    stack_settings.home.mkdir(parents=True, exist_ok=True)
    with Stack(stack_settings, stack_settings.home).up(gpus=GPUS):
        runtime = Runtime(stack_settings)
        yield runtime
        runtime.close()


def _submit(rt: Runtime, user: str, command: str, n: int) -> list[int]:
    """`n` jobs submitted one by one as `user` (a named user's submissions; their jobs run
    as the stack's own account)."""
    with contextlib.suppress(UserExists):
        users.add(rt.engine, user, same_account=True)
    return [call_local(rt, "submit", {"spec": {"command": f"{command} # {user} {i}"}},
                       Actor(user))["job_ids"][0] for i in range(n)]


def _all_ended(rt: Runtime, ids: list[int], timeout_s: float = 240) -> None:
    def ended() -> bool:
        with rt.session() as session:
            states = set(session.exec(select(Job.state).where(col(Job.id).in_(ids))))
        return states <= {"SUCCEEDED"}
    until(ended, timeout_s=timeout_s)


def _start_order(rt: Runtime, ids: list[int]) -> list[str]:
    """The owners of these jobs in the order the dispatcher started them (event order)."""
    with rt.session() as session:
        rows = session.exec(select(Job.owner).join(JobEvent, col(JobEvent.job_id) == col(Job.id))
                            .where(col(JobEvent.to_state) == "STARTING",
                                   col(Job.id).in_(ids)).order_by(col(JobEvent.id)))
        return list(rows)


def _contested(order: list[str], first: str, second: str) -> list[str]:
    """The starts from `second`'s first until either user has no job left to start."""
    begin = order.index(second)
    left = {first: order.count(first) - order[:begin].count(first),
            second: order.count(second)}
    window = []
    for owner in order[begin:]:
        if min(left.values()) == 0:
            break
        window.append(owner)
        left[owner] -= 1
    return window


def _longest_run(order: list[str]) -> int:
    return max(len(list(run)) for _, run in itertools.groupby(order))


def test_equal_weights_alternate_once_the_first_users_share_is_used(rt: Runtime):
    alice = _submit(rt, "alice", "sleep 0.5", JOBS_EACH)
    bob = _submit(rt, "bob", "sleep 0.5", JOBS_EACH)
    _all_ended(rt, alice + bob)
    window = _contested(_start_order(rt, alice + bob), "alice", "bob")
    assert len(window) >= JOBS_EACH, window
    a, b = window.count("alice"), window.count("bob")
    # Each GPU that frees goes to whoever runs fewer: neither gets more than a GPU's worth
    # of starts in a row, and the two get the same share.
    assert _longest_run(window) <= GPUS, window
    assert 0.75 <= a / b <= 1.33, window


def test_a_doubled_weight_gets_about_two_starts_to_one(rt: Runtime):
    call_local(rt, "set_limits", {"kind": "user", "name": "dave", "values": {"weight": 2}})
    carol = _submit(rt, "carol", "sleep 0.5", JOBS_EACH)
    dave = _submit(rt, "dave", "sleep 0.5", JOBS_EACH)
    _all_ended(rt, carol + dave)
    window = _contested(_start_order(rt, carol + dave), "carol", "dave")
    c, d = window.count("carol"), window.count("dave")
    assert c >= 5, window
    assert 1.5 <= d / c <= 2.7, window


def test_a_user_at_the_gpu_limit_never_runs_more_by_the_jobs_own_spans(rt: Runtime,
                                                                        tmp_path: Path):
    call_local(rt, "set_limits", {"kind": "user", "name": "erin", "values": {"max_gpus": 2}})
    spans = tmp_path / "spans"
    spans.mkdir()
    record = (f"date +%s.%N > {spans}/$GPUQ_JOB_ID.start; sleep 0.5; "
              f"date +%s.%N > {spans}/$GPUQ_JOB_ID.end")
    erin = _submit(rt, "erin", record, 12)
    frank = _submit(rt, "frank", "sleep 0.3", 4)
    _all_ended(rt, erin + frank)
    edges = []
    for job_id in erin:
        start = float((spans / f"{job_id}.start").read_text())
        end = float((spans / f"{job_id}.end").read_text())
        edges += [(start, 1), (end, -1)]
    running, most = 0, 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        running += step
        most = max(most, running)
    assert most == 2, "erin ran more than her limit, or never used it"
