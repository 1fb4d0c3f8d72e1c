"""GPUQ_HOME is closed to the box's other users: a second OS user, made here, can neither
list it nor read the database, the embedded Redis's files or a job's log, even where the
home lies under a directory everyone may enter and the umask would open what gpuq writes.
A home made open before is closed at the next start."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.paths import JobPaths
from app.core.settings import Settings
from app.runtime import Runtime
from tests.support.servers import as_other


@pytest.fixture
def open_place() -> Iterator[Path]:
    """A directory every user may enter, as /tmp or a shared /home are."""
    place = Path(tempfile.mkdtemp(prefix="gpuq-shared-"))
    place.chmod(0o755)
    yield place
    shutil.rmtree(place, ignore_errors=True)


def _started(home: Path) -> Runtime:
    previous = os.umask(0o022)  # a umask that leaves new files readable by all
    try:
        rt = Runtime(Settings(home=home, redis_url=None, database_url=None, _env_file=None))
        rt.check_database()
        log = JobPaths(home, 1).log
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("the job's output\n")
    finally:
        os.umask(previous)
    return rt


def test_another_local_user_can_neither_list_the_home_nor_read_its_files(other_user,
                                                                         open_place):
    home = open_place / "gpuq"
    rt = _started(home)
    try:
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        # The second user reaches the directory around it (so a refusal below is the home's)
        assert as_other(other_user, "ls", str(open_place)).returncode == 0
        for argv in (["ls", str(home)], ["cat", str(home / "gpuq.db")],
                     ["cat", str(JobPaths(home, 1).log)]):
            result = as_other(other_user, *argv)
            assert result.returncode != 0, argv
            assert b"Permission denied" in result.stderr, result.stderr
        # while its owner still reads what it wrote
        assert JobPaths(home, 1).log.read_text() == "the job's output\n"
    finally:
        rt.close()


def test_a_home_left_open_is_closed_at_the_next_start(other_user, open_place):
    home = open_place / "gpuq"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    (home / "left.txt").write_text("written while the home was open\n")
    assert as_other(other_user, "cat", str(home / "left.txt")).returncode == 0
    rt = _started(home)
    try:
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        assert as_other(other_user, "cat", str(home / "left.txt")).returncode != 0
    finally:
        rt.close()


def test_another_local_user_cannot_use_the_embedded_redis(other_user, open_place):
    # Given a stack's embedded Redis, started with no password configured
    from app.store.embedded_redis import PASSWORD_FILE, EmbeddedRedis

    settings = Settings(home=open_place / "gpuq", redis_url=None, _env_file=None)
    server = EmbeddedRedis(settings)
    url = server.start()
    try:
        kept = settings.redis_dir / PASSWORD_FILE
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600, "the generated password is private"
        port = url.rsplit(":", 1)[1].split("/")[0]
        # When a second local user reaches its port and speaks Redis without the password
        probe = ("import socket\n"
                 f"s = socket.create_connection(('127.0.0.1', {port}), timeout=20)\n"
                 "s.sendall(b'SET taken-over 1\\r\\nKEYS *\\r\\n')\n"
                 "got = b''\n"
                 "while got.count(b'\\r\\n') < 2:\n"
                 "    got += s.recv(4096)\n"
                 "print(got)\n")
        result = as_other(other_user, "python3", "-c", probe)
        # Then every command is refused for want of authentication, and nothing is written
        assert result.returncode == 0, result.stderr
        assert result.stdout.count(b"NOAUTH") == 2, result.stdout
        import redis

        client = redis.Redis.from_url(url)
        try:
            assert client.get("taken-over") is None
        finally:
            client.close()
    finally:
        server.stop()
    # And the next start reuses the same password, so clients holding the URL reconnect
    again = EmbeddedRedis(settings)
    try:
        assert again.start() == url
    finally:
        again.stop()
