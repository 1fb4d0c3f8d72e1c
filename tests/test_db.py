"""The database gpuq opens: a schema from an older version is refused with the fix."""

from __future__ import annotations

import sqlite3

import pytest

from app.core.errors import SchemaOutdated
from app.core.settings import Settings
from app.store.db import make_engine


def test_a_database_an_older_gpuq_made_is_refused_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("GPUQ_DATABASE_URL", raising=False)  # this test's own SQLite file
    # Given a SQLite database whose jobs table lacks columns this version needs
    home = tmp_path / "home"
    home.mkdir()
    old = sqlite3.connect(home / "gpuq.db")
    old.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, command TEXT)")
    old.close()
    settings = Settings(home=home, _env_file=None)
    # When gpuq opens it, then it says what is missing and how to go on
    with pytest.raises(SchemaOutdated, match=r"made by an older gpuq and lacks jobs\.name.*"
                       r"jobs\.waiting.*move it aside"):
        make_engine(settings)
