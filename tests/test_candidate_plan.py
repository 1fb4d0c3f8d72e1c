"""The dispatcher's queries are served by indexes, the candidate queries in the order they
read, on SQLite and PostgreSQL: no plan sorts or scans the queue, so a pass costs the same
at any depth. The plans are the databases' own (EXPLAIN), on a table filled with a queue."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, insert, make_url, text
from sqlmodel import col, select

from app.core.settings import Settings
from app.store.db import make_engine
from app.store.dependencies import waiting_query as stranded_query
from app.store.jobs import holding_query
from app.store.models import Job
from scheduler.dispatch.allocator import candidates, next_group
from tests.conftest import EXTERNAL_DB


@pytest.fixture(params=["sqlite", "sqlite-analysed", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """gpuq's engine on a database of this test's own: a SQLite file, or a new database on
    the PostgreSQL server GPUQ_DATABASE_URL names (dropped afterwards)."""
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
    """A deep queue: PENDING GPU and 0-GPU jobs of several priorities, some waiting for
    others, some for batch backends, and finished jobs, in the proportions of a sweep."""
    now = time.time()
    rows: list[dict[str, Any]] = []
    for i in range(30_000):
        state = "PENDING" if i % 5 else ("SUCCEEDED", "RUNNING", "FAILED")[i % 3]
        rows.append({"command": f"train --seed {i}", "submitted_at": now, "env": {},
                     "recover_exit_codes": [], "state": state, "priority": (0, 0, 1, 5)[i % 4],
                     "gpus": (1, 1, 2, 0)[i % 4], "waiting": i % 11 == 0,
                     "backend": "slurm" if i % 13 == 0 else "local",
                     "owner": f"user{i % 7}", "project": f"project{i % 3}"})
    with engine.begin() as conn:
        conn.execute(insert(Job.__table__), rows)  # type: ignore[arg-type]
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


def test_the_check_fails_on_a_query_that_sorts(engine: Engine):
    """The same check on a query no index serves in order (by submission time): the test
    above can fail."""
    query = candidates(True, *GROUP).order_by(None).order_by(col(Job.submitted_at)).limit(64)
    lines, _ = _plan(engine, query)
    if engine.dialect.name == "sqlite":
        assert any("TEMP B-TREE" in line for line in lines)
    else:
        assert any(node.startswith(("Sort", "Incremental Sort")) for node in lines)
