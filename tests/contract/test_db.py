"""The database gpuq opens: an empty one gets today's schema; one behind or ahead of this
gpuq's schema is refused with the fix."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import inspect

from app.core.errors import SchemaOutdated, SchemaTooNew
from app.core.settings import Settings
from app.store import schema
from app.store.db import make_engine
from app.store.migrations import HEAD_REVISION

OLD_SCHEMA = Path(__file__).parents[1] / "support" / "fixtures" / "schema_11228aa_sqlite.sql"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("GPUQ_DATABASE_URL", raising=False)  # this test's own SQLite file
    home = tmp_path / "home"
    home.mkdir()
    return home


def _sql(home: Path, script: str) -> None:
    db = sqlite3.connect(home / "gpuq.db")
    db.executescript(script)
    db.close()


def test_an_empty_database_gets_the_tables_at_the_head_revision(home):
    engine = make_engine(Settings(home=home, _env_file=None))
    assert {"jobs", "job_events", "launches", "job_dependencies"} <= set(
        inspect(engine).get_table_names())
    assert schema.current(engine).revision == HEAD_REVISION
    engine.dispose()


def test_a_database_an_older_gpuq_made_is_refused_naming_the_command(home):
    # Given the tables the gpuq of before migrations made, with no alembic_version
    _sql(home, OLD_SCHEMA.read_text())
    # When gpuq opens it, then it says so in one line naming the command that upgrades it
    with pytest.raises(SchemaOutdated, match=r"made by an older gpuq.*run `gpuq db upgrade`$"):
        make_engine(Settings(home=home, _env_file=None))


def test_a_database_of_a_newer_gpuq_is_refused_naming_that_gpuq_is_older(home):
    make_engine(Settings(home=home, _env_file=None)).dispose()
    _sql(home, "UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(SchemaTooNew, match=r"revision 9999.*this gpuq is older than the "
                       r"database"):
        make_engine(Settings(home=home, _env_file=None))


def test_a_database_older_than_migrations_is_not_stamped_but_refused_naming_the_fix(home):
    # Given a database whose jobs table lacks columns even the first revision has
    _sql(home, "CREATE TABLE jobs (id INTEGER PRIMARY KEY, command TEXT)")
    engine = make_engine(Settings(home=home, _env_file=None), check_revision=False)
    # When it is upgraded, then it is left alone, and the error says what is missing
    with pytest.raises(SchemaOutdated, match=r"lacks .*jobs\.name.*jobs\.waiting.*move it "
                       r"aside"):
        schema.upgrade(engine, "here")
    assert schema.current(engine).revision is None
    engine.dispose()


def test_a_database_at_an_older_revision_is_refused_naming_the_command(home, monkeypatch):
    # Given a database at today's head, opened by a gpuq whose head is one revision on
    make_engine(Settings(home=home, _env_file=None)).dispose()
    newer = f"{int(HEAD_REVISION) + 1:04d}"
    monkeypatch.setattr(schema, "HEAD_REVISION", newer)
    # Then it names the database's revision, the code's, and the command
    with pytest.raises(SchemaOutdated, match=rf"at schema revision {HEAD_REVISION}, behind "
                       rf"this gpuq's {newer}; run `gpuq db upgrade`$"):
        make_engine(Settings(home=home, _env_file=None))
