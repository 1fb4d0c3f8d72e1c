"""Refusals where there were tracebacks: a page for an id beyond the id columns, a
database locked past its busy timeout, a command too long to split."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.settings import Settings
from app.dashboard import create_app
from app.store.models import Job
from scheduler.worker.executor import BASH, SPLIT_LIMIT_CHARS, argv_for
from tests.support.dashboard_http import dashboard_client
from tests.support.servers import server_env

GPUQ = str(Path(sys.executable).parent / "gpuq")


@pytest.mark.parametrize("path", ["/jobs/99999999999999999999", "/jobs/2147483648",
                                  "/partials/jobs/99999999999999999999", "/jobs/0"])
def test_a_page_for_an_id_beyond_the_id_columns_is_404(settings, local, path):
    with dashboard_client(create_app(settings, local), raise_server_exceptions=False) as http:
        response = http.get(path)
    assert response.status_code == 404
    assert "no job with id" in response.text


@pytest.mark.timeout(300)  # the 30 s busy timeout, and three CLI starts on a slow machine
def test_a_database_locked_past_its_busy_timeout_is_one_line_and_stores_nothing(
        settings, tmp_path):
    # SQLite on purpose, whatever the suite's database: its busy timeout is what is tested.
    settings = Settings(home=tmp_path / "lock-home", redis_url=settings.redis_url,
                        database_url=None, hostname="lockhost", _env_file=None)
    env = server_env(settings)
    first = subprocess.run([GPUQ, "submit", "--", "true"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    holder = sqlite3.connect(settings.home / "gpuq.db", isolation_level=None)
    try:
        # Held until the submit has ended: longer than its 30 s busy timeout.
        holder.execute("BEGIN EXCLUSIVE")
        refused = subprocess.run([GPUQ, "submit", "--", "echo", "second"], env=env,
                                 capture_output=True, text=True, timeout=120)
    finally:
        holder.rollback()
        holder.close()
    assert refused.returncode == 2
    assert "Traceback" not in refused.stderr
    assert refused.stderr.startswith("error: the database did not answer: database is locked")
    assert len(refused.stderr.strip().splitlines()) == 1
    listed = subprocess.run([GPUQ, "queue", "--json"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert '"total": 1' in listed.stdout


def test_a_long_command_goes_to_bash_unsplit_and_a_short_plain_one_runs_directly():
    job = Job(command="x")
    path = {"PATH": "/usr/bin:/bin"}
    long_word = "x" * (SPLIT_LIMIT_CHARS * 16)  # shlex.split is quadratic in one word
    assert argv_for(job, f"echo {long_word}", path) == [BASH, "-c", f"echo {long_word}"]
    assert argv_for(job, "echo short words", path) == ["echo", "short", "words"]
