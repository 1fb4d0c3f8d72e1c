"""0-GPU jobs on real Redis and a real database, without workers: they are routed only into
the CPU slots live workers offer, shared among users by fair share, and held to each user's
and project's max_cpu_jobs."""

from __future__ import annotations

from collections import Counter

from app.store import cluster, limits
from app.store.jobs import create_jobs
from app.store.spec import JobSpec
from scheduler.dispatch.allocator import Dispatcher


def _queue(rt, owner: str, n: int, project: str = "") -> None:
    with rt.session() as session:
        create_jobs(session, JobSpec.parse({"command": f"true # {owner}", "gpus": 0,
                                            "project": project or None}),
                    n, launch=True, owner=owner)


def _started(rt) -> Counter[str]:
    from sqlmodel import col, select

    from app.store.models import Job

    with rt.session() as session:
        return Counter(session.exec(select(col(Job.owner)).where(
            col(Job.state) == "STARTING")).all())


def test_cpu_slots_go_to_the_user_running_fewest_first(rt):
    # Given two CPU slots, and alice's 20 jobs queued before bob's 20
    cluster.beat_cpu(rt.redis, "h", 2, 600)
    _queue(rt, "alice", 20)
    _queue(rt, "bob", 20)
    # When a pass routes them
    Dispatcher(rt).dispatch()
    # Then each user got one slot, not alice both
    assert _started(rt) == {"alice": 1, "bob": 1}


def test_max_cpu_jobs_holds_a_user_and_a_project_to_their_limit(rt):
    # Given five CPU slots, alice held to one 0-GPU job at once, project p to two
    cluster.beat_cpu(rt.redis, "h", 5, 600)
    with rt.engine.begin() as conn:
        limits.write(conn, "user", "alice", {"max_cpu_jobs": 1})
        limits.write(conn, "project", "p", {"max_cpu_jobs": 2})
    _queue(rt, "alice", 5)
    _queue(rt, "bob", 5, project="p")
    _queue(rt, "carol", 5, project="p")
    _queue(rt, "dave", 1)
    # When passes route them
    for _ in range(3):
        Dispatcher(rt).dispatch()
    # Then alice runs one, bob and carol two between them, and dave the slot left over
    started = _started(rt)
    assert started["alice"] == 1 and started["bob"] + started["carol"] == 2
    assert started["dave"] == 1 and sum(started.values()) == 4
