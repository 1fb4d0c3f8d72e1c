"""Fixtures: real Redis (embedded, or GPUQ_REDIS_URL), a real database (SQLite, or
GPUQ_DATABASE_URL), and real worker processes for the end-to-end tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import SQLModel

from app.client import Client
from app.core.settings import Settings
from app.runtime import Runtime
from app.store.embedded_redis import EmbeddedRedis
from tests.support.servers import (  # noqa: F401  (tests import them from here too)
    EXTERNAL_DB,
    EXTERNAL_REDIS,
    IN_CI,
    OTHER_USER,
    PREFLIGHT_FAKES,
    ROOT,
    Stack,
    _reset_database,
    as_other,
    clean_servers,
    missing,
    processes_with,
    server_env,
    until,
)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The machine's Redis when GPUQ_REDIS_URL names one, else an embedded server."""
    if EXTERNAL_REDIS:
        yield EXTERNAL_REDIS
        return
    home = tmp_path_factory.mktemp("redis-home")
    server = EmbeddedRedis(Settings(home=home, _env_file=None))
    try:
        url = server.start()
    except Exception as e:
        missing(f"no Redis could be started here: {e}")
    yield url
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _fresh_external_schema() -> None:
    """Tables left by an older run may be at an older revision: start from an empty database,
    which the first make_engine brings to the head."""
    if not EXTERNAL_DB:
        return
    from sqlmodel import create_engine

    # A plain engine: gpuq's own refuses a database behind its schema.
    engine = create_engine(EXTERNAL_DB)
    SQLModel.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Iterator[Settings]:
    """Settings for one test: its own home, a clean Redis and a clean database."""
    clean_servers(redis_url)
    yield Settings(home=tmp_path / "home", redis_url=redis_url, database_url=EXTERNAL_DB,
                   hostname="testhost", fake_gpus=2, kill_grace_s=1, heartbeat_s=1,
                   _env_file=None)


@pytest.fixture
def rt(settings: Settings) -> Iterator[Runtime]:
    runtime = Runtime(settings)
    yield runtime
    runtime.close()


@pytest.fixture
def local(settings: Settings) -> Iterator[Client]:
    """An in-process client on this test's settings (no workers)."""
    c = Client(settings, "local")
    yield c
    c.close()


@pytest.fixture(scope="module")
def stack_settings(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                   redis_url: str) -> Settings:
    """Module-wide settings for end-to-end tests that share one running stack."""
    clean_servers(redis_url)
    home = tmp_path_factory.mktemp("stack-home")
    # A visibility timeout far shorter than the jobs: proves no job is redelivered and
    # run twice when it outlives it.
    # A host name per test module: each module's stack has queues of its own.
    host = "e2e-" + request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    return Settings(home=home, redis_url=redis_url, database_url=EXTERNAL_DB,
                    hostname=host, fake_gpus=2, kill_grace_s=1, heartbeat_s=1,
                    monitor_interval_s=0.5, visibility_timeout_s=2, cpu_slots=1,
                    max_result_bytes=1_000_000,
                    preflight_commands=PREFLIGHT_FAKES, _env_file=None)


@pytest.fixture(scope="module")
def stack(stack_settings: Settings) -> Iterator[Stack]:
    stack_settings.home.mkdir(parents=True, exist_ok=True)
    with Stack(stack_settings, stack_settings.home).up(gpus=2) as running:
        yield running


@pytest.fixture
def client(stack: Stack, stack_settings: Settings) -> Iterator[Client]:
    c = Client(stack_settings, "local")
    yield c
    c.close()


@pytest.fixture
def remote_client(stack: Stack, stack_settings: Settings) -> Iterator[Client]:
    c = Client(stack_settings, "remote")
    yield c
    c.close()


@pytest.fixture(scope="session")
def other_user() -> Iterator[str]:
    """A second local OS user, made for the session (and removed after it) where the tests
    run as root; elsewhere the test is skipped."""
    if os.geteuid() != 0 or not (shutil.which("useradd") and shutil.which("runuser")):
        missing("acting as a second local user needs root, useradd and runuser")
    made = subprocess.run(["id", OTHER_USER], capture_output=True).returncode != 0
    if made:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh",
                        OTHER_USER], check=True)
    yield OTHER_USER
    if made:
        subprocess.run(["userdel", OTHER_USER], check=False)
