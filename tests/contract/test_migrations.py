"""Schema migrations, on SQLite and (where GPUQ_DATABASE_URL names one) PostgreSQL: a
database gpuq made before migrations is upgraded by `gpuq db upgrade` with every job intact;
one behind is refused; fresh ones opened at once by several processes all open; and the head
revision is exactly the models' schema."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, MetaData, create_engine, insert, make_url, text
from sqlmodel import SQLModel

from app.core.errors import SchemaOutdated
from app.core.identity import stack_owner
from app.core.settings import Settings
from app.ops.registry import call_local
from app.runtime import Runtime
from app.store import schema
from app.store.db import make_engine
from app.store.jobs import create_jobs
from app.store.migrations import HEAD_REVISION
from app.store.spec import JobSpec
from tests.support.servers import EXTERNAL_DB, ROOT, server_env

FIXTURES = Path(__file__).parents[1] / "support" / "fixtures"
GPUQ = str(Path(sys.executable).parent / "gpuq")

# What the gpuq of commit 11228aa wrote: a launch of two replicas, jobs in several states
# with their events, and one job waiting on another.
LAUNCHES = [{"id": 1, "name": "sweep", "num_jobs": 2, "command": "python train.py {rank}",
             "created_at": 1000.0, "payload_key": None}]
JOBS: list[dict[str, Any]] = [
    {"id": 1, "name": "sweep", "launch_id": 1, "rank": 0, "num_jobs": 2,
     "command": "python train.py 0", "state": "SUCCEEDED", "exit_code": 0, "host": "h1",
     "gpu_ids": [0], "attempt": 1, "started_at": 1001.0, "ended_at": 1011.0,
     "runtime_s": 0.0},
    {"id": 2, "name": "sweep", "launch_id": 1, "rank": 1, "num_jobs": 2,
     "command": "python train.py 1", "state": "FAILED", "exit_code": 3, "host": "h1",
     "gpu_ids": [1], "attempt": 2, "restart_count": 1, "max_restarts": 1,
     "recover_exit_codes": [137], "reason": "exit code 3", "started_at": 1002.0,
     "ended_at": 1003.0, "runtime_s": 4.0},
    {"id": 3, "name": "eval", "command": "python eval.py", "state": "RUNNING", "gpus": 2,
     "host": "h2", "gpu_ids": [0, 1], "attempt": 1, "pid": 4242, "started_at": 1004.0,
     "env": {"SEED": "7"}, "priority": 5},
    {"id": 4, "name": "report", "command": "make report", "state": "PENDING", "gpus": 0,
     "waiting": True},
    {"id": 5, "name": None, "command": "sleep 100", "state": "CANCELLED",
     "reason": "cancelled by user", "ended_at": 1005.0},
]
JOB_DEFAULTS = {"launch_id": None, "rank": 0, "num_jobs": 1, "kind": "command",
                "payload_key": None, "env": {}, "workdir": None, "venv": None,
                "conda_env": None, "gpus": 1, "allowed_gpu_ids": None, "priority": 0,
                "backend": "local", "backend_id": None, "dispatched_at": None,
                "preflight": None, "tmux": False, "origin": None, "waiting": False,
                "max_restarts": 0, "recover_exit_codes": [], "content_hash": None,
                "reason": None, "host": None, "gpu_ids": None, "attempt": 0,
                "restart_count": 0, "exit_code": None, "pid": None, "submitted_at": 1000.0,
                "started_at": None, "ended_at": None, "runtime_s": 0.0}
PATHS = {"SUCCEEDED": ["PENDING", "STARTING", "RUNNING", "SUCCEEDED"],
         "FAILED": ["PENDING", "STARTING", "RUNNING", "FAILED"],
         "RUNNING": ["PENDING", "STARTING", "RUNNING"], "PENDING": ["PENDING"],
         "CANCELLED": ["PENDING", "CANCELLED"]}
DEPENDENCIES = [{"job_id": 4, "after_id": 3}]


def _events(job: dict[str, Any]) -> list[dict[str, Any]]:
    path = PATHS[job["state"]]
    return [{"job_id": job["id"], "at": 1000.0 + i, "from_state": source, "to_state": target,
             "reason": job["reason"] if target == job["state"] else None}
            for i, (source, target) in enumerate(zip([None, *path], path, strict=False))]


def _job(job: dict[str, Any]) -> dict[str, Any]:
    return {**JOB_DEFAULTS, **job}


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """This test's own empty database: a new one on the PostgreSQL server GPUQ_DATABASE_URL
    names, dropped afterwards; else a SQLite file."""
    if not EXTERNAL_DB or EXTERNAL_DB.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'home' / 'gpuq.db'}"
        return
    admin = create_engine(EXTERNAL_DB, isolation_level="AUTOCOMMIT")
    name = f"gpuq_mig_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(EXTERNAL_DB).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    (tmp_path / "home").mkdir(exist_ok=True)
    return Settings(home=tmp_path / "home", database_url=database_url, _env_file=None)


@pytest.fixture
def plain(database_url: str) -> Iterator[Engine]:
    """An engine that is not gpuq's: it opens any database as it is."""
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def _old_database(engine: Engine) -> None:
    """The tables gpuq made at commit 11228aa, and rows as that gpuq wrote them."""
    ddl = (FIXTURES / f"schema_11228aa_{engine.dialect.name}.sql").read_text()
    statements = [s for s in "\n".join(line for line in ddl.splitlines()
                                       if not line.startswith("--")).split(";") if s.strip()]
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))
        _seed(conn, [_job(j) for j in JOBS])


def _seed(conn: Connection, jobs: list[dict[str, Any]]) -> None:
    """JOBS' launch, `jobs`, their events and edges, into the tables as they are (not
    today's models), with PostgreSQL's sequences past the ids given."""
    tables = MetaData()
    tables.reflect(conn)
    conn.execute(insert(tables.tables["launches"]), LAUNCHES)
    conn.execute(insert(tables.tables["jobs"]), jobs)
    conn.execute(insert(tables.tables["job_events"]), [e for j in jobs for e in _events(j)])
    conn.execute(insert(tables.tables["job_dependencies"]), DEPENDENCIES)
    if conn.dialect.name == "postgresql":  # the ids above were given, not drawn
        for table in ("jobs", "launches", "job_events"):
            conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                              f"(SELECT max(id) FROM {table}))"))


KEPT = ("jobs", "launches", "job_events", "job_dependencies")


def _upgraded_keeping(settings: Settings, plain: Engine) -> dict[str, list[Any]]:
    """The rows of KEPT as they were, once `gpuq db upgrade` has run on them."""
    kept = {table: _rows(plain, table) for table in KEPT}
    upgraded = _gpuq(settings, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    return kept


def _assert_kept(plain: Engine, kept: dict[str, list[Any]]) -> None:
    """Every row as it was (later revisions may add columns of their own, after the old)."""
    for table, rows in kept.items():
        assert [row[:len(rows[0])] for row in _rows(plain, table)] == rows, table


def _gpuq(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = server_env(settings, PYTHONPATH=str(ROOT))
    return subprocess.run([GPUQ, *args], env=env, capture_output=True, text=True, timeout=60)


def test_a_database_made_before_migrations_is_upgraded_with_every_job_intact(settings, plain):
    # Given a database the gpuq of 11228aa made and filled
    _old_database(plain)
    # When it is upgraded by the command line
    before = _gpuq(settings, "db", "current")
    upgraded = _gpuq(settings, "db", "upgrade")
    after = _gpuq(settings, "db", "current")
    # Then `gpuq db current` told it was behind, then up to date
    assert before.returncode == 0, before.stderr
    assert "revision: none (made before migrations)" in before.stdout
    assert "run `gpuq db upgrade`" in before.stdout
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"upgraded from none (made before migrations) to {HEAD_REVISION}" in upgraded.stdout
    assert f"revision: {HEAD_REVISION}\nhead:     {HEAD_REVISION}\nup to date" in after.stdout
    # And every job reads back through the operations layer as it was written
    rt = Runtime(settings)
    try:
        queue = call_local(rt, "queue", {"limit": 100})
        assert queue["total"] == len(JOBS)
        assert sorted(row["id"] for row in queue["jobs"]) == [j["id"] for j in JOBS]
        for written in map(_job, JOBS):
            _assert_reads_back(call_local(rt, "job", {"job_id": written["id"]}), written)
        launch = call_local(rt, "launches", {"launch_id": 1})["launches"][0]
        assert launch["counts"] == {"SUCCEEDED": 1, "FAILED": 1}
        # And the jobs and launches from before owners belong to the stack's owner
        assert {row["owner"] for row in queue["jobs"]} == {stack_owner().name}
        assert launch["owner"] == stack_owner().name
        # And a new launch takes ids after the old ones, running after an old job
        with rt.session() as session:
            spec = JobSpec(command="true", gpus=0, after=[1])
            launch_id, ids = create_jobs(session, spec, 2, launch=True)
        assert (launch_id, ids) == (2, [len(JOBS) + 1, len(JOBS) + 2])
    finally:
        rt.close()


def _assert_reads_back(row: dict[str, Any], written: dict[str, Any]) -> None:
    same = ("id", "name", "launch_id", "rank", "num_jobs", "command", "reason", "exit_code",
            "gpus", "gpu_ids", "host", "priority", "backend", "restart_count", "env", "pid",
            "tmux", "preflight")
    assert {k: row[k] for k in same} == {k: written[k] for k in same}
    assert row["status"] == written["state"]
    assert row["after"] == ([d["after_id"] for d in DEPENDENCIES if d["job_id"] == row["id"]]
                            or None)
    assert row["events"] == [{"at": e["at"], "from": e["from_state"], "to": e["to_state"],
                              "reason": e["reason"]} for e in _events(written)]


def test_a_database_behind_the_code_is_refused_at_open_naming_the_upgrade(settings, plain):
    _old_database(plain)
    with pytest.raises(SchemaOutdated, match=r"made by an older gpuq.*; run `gpuq db upgrade`$"):
        make_engine(settings)
    # And the command line says so in one line, exiting non-zero
    refused = _gpuq(settings, "queue")
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0
    assert refused.stderr.startswith("error: ") and "run `gpuq db upgrade`" in refused.stderr


def test_upgrading_a_database_at_the_head_changes_nothing(settings):
    make_engine(settings).dispose()
    again = _gpuq(settings, "db", "upgrade")
    assert again.returncode == 0, again.stderr
    assert f"already at {HEAD_REVISION}" in again.stdout


OPEN = """
from app.core.settings import Settings
from app.store.db import make_engine
from app.store.jobs import create_jobs
from app.store.spec import JobSpec
make_engine(Settings()).dispose()
"""


def test_several_processes_opening_a_fresh_database_at_once_all_open_it(settings, plain):
    # Given an empty database, when four processes open it at the same moment
    env = server_env(settings, PYTHONPATH=str(ROOT))
    opening = [subprocess.Popen([sys.executable, "-c", OPEN], env=env, stderr=subprocess.PIPE,
                                text=True) for _ in range(4)]
    outcomes = [(p.wait(timeout=90), p.stderr.read() if p.stderr else "") for p in opening]
    for p in opening:
        if p.stderr:
            p.stderr.close()
    # Then every one opens it, and it is at the head once
    assert [code for code, _ in outcomes] == [0, 0, 0, 0], outcomes
    with plain.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() \
            == [HEAD_REVISION]


def test_the_head_revision_is_exactly_the_models_schema(settings, plain):
    """Every change to app/store/models.py must come with a revision that makes it."""
    make_engine(settings).dispose()
    with plain.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = compare_metadata(context, SQLModel.metadata)
    assert differences == [], ("the models differ from the head revision; make a revision "
                               "(docs/architecture.md, Migrations)")


def test_head_revision_constant_is_the_head_alembic_finds():
    found = ScriptDirectory.from_config(schema._config()).get_current_head()
    assert found == HEAD_REVISION, (f"the newest revision is {found}: set HEAD_REVISION in "
                                    "app/store/migrations/__init__.py to it")


def _rows(engine: Engine, table: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(f"SELECT * FROM {table} ORDER BY 1, 2"))]


def _indexes(engine: Engine, table: str) -> dict[str, Any]:
    """Each index of `table` as the database writes it (its SQL on SQLite)."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            return dict(conn.execute(text(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = :t"),
                {"t": table}).all())
        return dict(conn.execute(text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = :t"),
            {"t": table}).all())


def test_an_upgrade_from_0006_keeps_every_row_and_index_and_ids_are_never_reused(settings,
                                                                                plain):
    # Given a database at 0006 with jobs, their launch, events and edges, one job from a
    # jobs file, and the attempt of a job 7 that retention already pruned
    with plain.begin() as conn:
        schema._alembic(conn, "upgrade", "0006")
    jobs = [*JOBS, {"id": 6, "name": "line", "command": "python line.py", "state": "PENDING",
                    "origin": "/srv/jobs.txt", "content_hash": "c0ffee"}]
    with plain.begin() as conn:
        tables = MetaData()
        tables.reflect(conn)
        conn.execute(insert(tables.tables["launches"]), LAUNCHES)
        conn.execute(insert(tables.tables["jobs"]), [_job(j) for j in jobs])
        conn.execute(insert(tables.tables["job_events"]),
                     [e for j in jobs for e in _events(_job(j))])
        conn.execute(insert(tables.tables["job_dependencies"]), DEPENDENCIES)
        conn.execute(insert(tables.tables["attempts"]), [{
            "job_id": 7, "attempt": 1, "owner": "o", "project": "o", "launch_id": 3,
            "backend": "local", "gpus": 1, "ended_at": 1000.0, "gpu_seconds": 0.0,
            "outcome": "SUCCEEDED"}])
        if plain.dialect.name == "postgresql":  # as a real sequence had: past the pruned 7
            for table, last in (("jobs", 7), ("launches", 3), ("job_events", 100)):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                  f"{last})"))
    indexes = {t: _indexes(plain, t) for t in ("jobs", "launches")}
    # When it is upgraded
    kept = _upgraded_keeping(settings, plain)
    # Then every row and every index (the partial ones too) is as it was (later revisions
    # may add columns of their own, after the old ones)
    _assert_kept(plain, kept)
    for table, found in indexes.items():  # (later revisions may add indexes of their own)
        assert found.items() <= _indexes(plain, table).items(), table
    assert len(indexes["jobs"]) >= 12
    # And the line of the jobs file is known apart from its job
    with plain.connect() as conn:
        assert conn.execute(text("SELECT origin, job_id FROM jobs_file_lines")).all() == [
            ("/srv/jobs.txt", 6)]
    # And once the newest job and launch are deleted, new ones take ids never handed out
    with plain.begin() as conn:
        conn.execute(text("DELETE FROM job_events WHERE job_id = 6"))
        conn.execute(text("DELETE FROM jobs WHERE id = 6"))
        conn.execute(text("UPDATE jobs SET launch_id = NULL"))
        conn.execute(text("DELETE FROM launches"))
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:  # the rebuild left the foreign keys on
            if engine.dialect.name == "sqlite":
                assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        from sqlmodel import Session

        with Session(engine) as session:
            launch_id, ids = create_jobs(session, JobSpec(command="true", gpus=0), 2,
                                         launch=True)
            session.commit()
        assert (launch_id, ids) == (4, [8, 9])
    finally:
        engine.dispose()


def test_an_upgrade_from_0008_keeps_every_user_on_the_stacks_account(settings, plain):
    # Given a database at 0008 with a named user and a revoked one
    with plain.begin() as conn:
        schema._alembic(conn, "upgrade", "0008")
        conn.execute(text("INSERT INTO users (name, token_hash, admin, created_at, revoked_at) "
                          "VALUES ('alice', 'h1', true, 1000.0, NULL), "
                          "('bob', 'h2', false, 1001.0, 1002.0)"))
    # When it is upgraded
    upgraded = _gpuq(settings, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    # Then both keep their rows, with no account and no token expiry or use recorded
    with plain.connect() as conn:
        rows = conn.execute(text("SELECT name, token_hash, admin, created_at, revoked_at, "
                                 "os_user, same_account, expires_at, last_used_at FROM users "
                                 "ORDER BY name")).all()
    assert [(*row[:2], bool(row.admin), *row[3:6], bool(row.same_account), *row[7:])
            for row in rows] == [
        ("alice", "h1", True, 1000.0, None, None, False, None, None),
        ("bob", "h2", False, 1001.0, 1002.0, None, False, None, None)]
    # And their jobs keep running as the stack's account, which the list says
    engine = make_engine(settings)
    try:
        from app.store import users

        assert users.run_as(engine, "alice") is None
    finally:
        engine.dispose()
    listed = _gpuq(settings, "user", "list")
    assert "alice admin: jobs as same account (added before accounts)" in listed.stdout


def test_an_upgrade_from_0011_keeps_every_job_and_limit_and_adds_no_time_limit(settings, plain):
    # Given a database at 0011 with jobs in several states, their launch, events and edges,
    # and an admin's limits for a user
    with plain.begin() as conn:
        schema._alembic(conn, "upgrade", "0011")
    with plain.begin() as conn:
        _seed(conn, [_job(j) for j in JOBS])
        conn.execute(text("INSERT INTO limits (kind, name, max_gpus, max_priority) VALUES "
                          "('user', 'alice', 2, 3)"))
    # When it is upgraded
    kept = _upgraded_keeping(settings, plain)
    # Then every row is as it was, each job without a time limit or signal
    with plain.connect() as conn:
        jobs = conn.execute(text("SELECT id, state, time_limit_s, signal FROM jobs "
                                 "ORDER BY id")).all()
        limit = conn.execute(text("SELECT max_gpus, max_priority, max_time_s, default_time_s "
                                  "FROM limits WHERE name = 'alice'")).one()
    assert [(j[0], j[1]) for j in jobs] == [(j["id"], j["state"]) for j in JOBS]
    assert {(j[2], j[3]) for j in jobs} == {(None, None)}
    assert tuple(limit) == (2, 3, None, None)
    _assert_kept(plain, kept)
    # And a new job keeps its limit and signal
    engine = make_engine(settings)
    try:
        from sqlmodel import Session

        with Session(engine) as session:
            _, ids = create_jobs(session, JobSpec(command="true", gpus=0, time_limit_s="2h",
                                                  signal="USR2@90"), 1, launch=False)
            session.commit()
        with engine.connect() as conn:
            assert tuple(conn.execute(text("SELECT time_limit_s, signal FROM jobs WHERE id = "
                                           f"{ids[0]}")).one()) == (7200, "USR2@90")
    finally:
        engine.dispose()


def test_an_upgrade_from_0012_keeps_every_job_and_adds_no_eta(settings, plain):
    # Given a database at 0012 with jobs in several states, their launch, events and edges
    with plain.begin() as conn:
        schema._alembic(conn, "upgrade", "0012")
    with plain.begin() as conn:
        _seed(conn, [{**_job(j), "time_limit_s": 600} for j in JOBS])
    # When it is upgraded
    kept = _upgraded_keeping(settings, plain)
    # Then every row is as it was, with its limit, and no job has an expected start yet
    with plain.connect() as conn:
        jobs = conn.execute(text("SELECT id, state, time_limit_s, eta, eta_basis FROM jobs "
                                 "ORDER BY id")).all()
    assert [(j[0], j[1]) for j in jobs] == [(j["id"], j["state"]) for j in JOBS]
    assert {tuple(j[2:]) for j in jobs} == {(600, None, None)}
    _assert_kept(plain, kept)
