"""The queries of every periodic path are served by indexes, on SQLite and PostgreSQL: the
dispatcher's candidates in the order they read, a batch sync's jobs to submit, the
reconciler's recent endings and their dependents, /metrics' jobs per user. No plan sorts or
scans the queue, so a tick costs the same at any depth. The plans are the databases' own
(EXPLAIN), on a table filled with a queue of 100,000 pending jobs."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, insert, make_url, text
from sqlmodel import Session, col, select

from app.core.settings import Settings
from app.store import counts
from app.store.db import make_engine
from app.store.dependencies import waiting_query
from app.store.dependencies import waiting_query as stranded_query
from app.store.jobs import batch_pending, holding_query
from app.store.models import BATCH_PENDING_INDEX, Job, JobCount, JobDependency
from scheduler.planner.candidates import candidates, next_group
from tests.support.servers import EXTERNAL_DB


@pytest.fixture(scope="module", params=["sqlite", "sqlite-analysed", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Engine]:
    """gpuq's engine on a database of this module's own, filled once: a SQLite file, or a
    new database on the PostgreSQL server GPUQ_DATABASE_URL names (dropped afterwards)."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    if request.param.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'gpuq.db'}"
        admin, name = None, None
    else:
        if not EXTERNAL_DB or not EXTERNAL_DB.startswith("postgresql"):
            pytest.skip("GPUQ_DATABASE_URL names no PostgreSQL server (CI's second pass does)")
        admin = create_engine(EXTERNAL_DB, isolation_level="AUTOCOMMIT")
        name = f"gpuq_plan_{secrets.token_hex(6)}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(EXTERNAL_DB).set(database=name).render_as_string(hide_password=False)
    built = make_engine(Settings(home=tmp_path, database_url=url, redis_url=None,
                                 _env_file=None))
    try:
        # SQLite plans without statistics unless someone runs ANALYZE; PostgreSQL's
        # autovacuum gathers them by itself.
        _fill(built, analyse=request.param != "sqlite")
        yield built
    finally:
        built.dispose()
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


def _fill(engine: Engine, analyse: bool) -> None:
    """A deep queue: 100,000 PENDING GPU and 0-GPU jobs of several priorities, some waiting
    for others (the job before each), some for batch backends, and finished jobs, in the
    proportions of a sweep."""
    now = time.time()
    rows: list[dict[str, Any]] = []
    for i in range(125_000):
        state = "PENDING" if i % 5 else ("SUCCEEDED", "RUNNING", "FAILED")[i % 3]
        rows.append({"command": f"train --seed {i}", "submitted_at": now, "env": {},
                     "recover_exit_codes": [], "state": state, "priority": (0, 0, 1, 5)[i % 4],
                     "gpus": (1, 1, 2, 0)[i % 4], "waiting": i % 11 == 0,
                     "backend": "slurm" if i % 13 == 0 else "local",
                     "owner": f"user{i % 7}", "project": f"project{i % 3}",
                     "ended_at": now - i if state in ("SUCCEEDED", "FAILED") else None})
    with engine.begin() as conn:
        conn.execute(insert(Job.__table__), rows)  # type: ignore[arg-type]
        conn.execute(insert(JobDependency.__table__), [  # type: ignore[arg-type]
            {"job_id": i + 1, "after_id": i} for i in range(11, 125_000, 11) if i % 5])
        if analyse:
            conn.execute(text("ANALYZE"))


def _plan(engine: Engine, query: Any) -> tuple[list[str], str]:
    """The plan's lines, and its text, for the query with its values written in."""
    sql = str(query.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            lines = [str(row[-1]) for row in conn.execute(text("EXPLAIN QUERY PLAN " + sql))]
            return lines, "\n".join(lines)
        (plan,), = conn.execute(text("EXPLAIN (FORMAT JSON) " + sql)).all()
        nodes: list[str] = []

        def walk(node: dict[str, Any]) -> None:
            nodes.append(f"{node['Node Type']} {node.get('Index Name', '')}".strip())
            for child in node.get("Plans", []):
                walk(child)

        walk(plan[0]["Plan"])
        return nodes, json.dumps(plan)


GROUP = (col(Job.priority) == 1, col(Job.owner) == "user3", col(Job.project) == "project1")
QUERIES = {
    "the first group of the highest priority": lambda: next_group("first").params(
        below=2**31 - 1),
    "the first group of the next priority": lambda: next_group("first").params(below=5),
    "the owner's next project at a priority": lambda: next_group("same_owner").params(
        priority=1, owner="user3", project="project1"),
    "the next owner at a priority": lambda: next_group("next_owner").params(
        priority=1, owner="user3"),
    "first GPU candidates of a group": lambda: candidates(True, *GROUP).limit(64),
    "the rest of a group": lambda: candidates(True, *GROUP, col(Job.id) > 12_000).limit(64),
    "0-GPU candidates": lambda: candidates(False).limit(1000),
    "GPUs held in the database": holding_query,
    "jobs waiting for others": lambda: stranded_query(),
    "a state's newest jobs": lambda: select(col(Job.id)).where(
        col(Job.state) == "PENDING").order_by(col(Job.id).desc()).limit(50),
    "a batch backend's jobs to submit": lambda: batch_pending("slurm", time.time()).limit(50),
}
# The reconciler's and /metrics' reads, which sort nothing but must not scan either: each
# table is searched through an index (SQLite: SEARCH, never SCAN; PostgreSQL: no Seq Scan).
SEARCHES = {
    "jobs that ended since the last tick": lambda: select(col(Job.id)).where(
        col(Job.ended_at) >= time.time() - 60),
    "the dependents of those jobs": lambda: select(col(JobDependency.job_id)).where(
        col(JobDependency.after_id).in_([2, 5, 10])),
    "the dependencies of those dependents": lambda: select(
        col(JobDependency.job_id), col(Job.state)).join(
        Job, col(Job.id) == JobDependency.after_id).where(
        col(JobDependency.job_id).in_(waiting_query().where(col(Job.id).in_([12, 23])))),
}


@pytest.mark.parametrize("which", list(QUERIES))
def test_a_dispatch_query_reads_an_index_in_order_without_sorting(engine: Engine,
                                                                    which: str):
    lines, plan = _plan(engine, QUERIES[which]())
    if engine.dialect.name == "sqlite":
        assert not any("TEMP B-TREE" in line or (line.startswith("SCAN jobs") and "INDEX"
                                                 not in line) for line in lines), plan
    else:
        # PostgreSQL may read another index already in the order asked (the primary key,
        # with the priority fixed): any ordered index read will do, a sort or a full scan
        # will not.
        assert not any(node.startswith(("Sort", "Incremental Sort")) for node in lines), plan
        assert not any(node.startswith("Seq Scan") for node in lines), plan


def test_a_batch_sync_reads_only_the_batch_jobs_waiting(engine: Engine):
    """Through the partial index of batch jobs waiting, not the index of every PENDING job:
    a sync's read stops at its room however many local jobs wait beside."""
    _, plan = _plan(engine, QUERIES["a batch backend's jobs to submit"]())
    assert BATCH_PENDING_INDEX in plan, plan


@pytest.mark.parametrize("which", list(SEARCHES))
def test_a_reconcile_query_searches_an_index_and_scans_no_table(engine: Engine, which: str):
    lines, plan = _plan(engine, SEARCHES[which]())
    if engine.dialect.name == "sqlite":
        assert lines and not any(line.startswith("SCAN") for line in lines), plan
    else:
        assert not any(node.startswith("Seq Scan") for node in lines), plan


def test_jobs_per_user_come_from_the_kept_counts_at_any_depth(engine: Engine):
    """/metrics' jobs per user and state: a few rows of job_counts, equal to the jobs."""
    with Session(engine) as session:
        counts.recount(session)
        session.commit()
        kept = counts.by_owner(session, ["PENDING", "RUNNING"])
        counted = {(o, s): n for o, s, n in session.execute(
            select(col(Job.owner), col(Job.state), func.count())
            .where(col(Job.state).in_(["PENDING", "RUNNING"]))
            .group_by(col(Job.owner), col(Job.state)))}
        rows = session.scalar(select(func.count()).select_from(JobCount)) or 0
    assert kept == counted and sum(n for (_, s), n in kept.items() if s == "PENDING") >= 100_000
    assert rows <= 7 * 6, "a row per owner and state, however many jobs"


def test_the_check_fails_on_a_query_that_sorts(engine: Engine):
    """The same check on a query no index serves in order (by submission time): the test
    above can fail."""
    query = candidates(True, *GROUP).order_by(None).order_by(col(Job.submitted_at)).limit(64)
    lines, _ = _plan(engine, query)
    if engine.dialect.name == "sqlite":
        assert any("TEMP B-TREE" in line for line in lines)
    else:
        assert any(node.startswith(("Sort", "Incremental Sort")) for node in lines)
