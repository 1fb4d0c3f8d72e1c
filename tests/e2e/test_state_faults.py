"""The state gpuq keeps on disk gone bad, as a user meets it on the command line: a damaged
SQLite file, a read-only GPUQ_HOME and a full disk each get one line naming the file or
directory and the fix, from every everyday command and from `gpuq up`."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import IN_CI, server_env

pytestmark = pytest.mark.e2e
GPUQ = str(Path(sys.executable).parent / "gpuq")
COMMANDS = [("submit", "--", "echo", "hi"), ("queue",), ("status",), ("logs", "1")]


@pytest.fixture
def sqlite_settings(settings, tmp_path):
    """This test's settings on SQLite under its home (whatever database the suite uses),
    with a Procfile for `gpuq up` whose one program never gets to start."""
    (tmp_path / "Procfile").write_text("idle: sleep 60\n")
    return settings.model_copy(update={"database_url": None})


def _commands(procfile: Path) -> list[tuple[str, ...]]:
    return [*COMMANDS, ("up", "--no-flower", "--procfile", str(procfile))]


def _gpuq(settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GPUQ, *args], env=server_env(settings), capture_output=True,
                          text=True, timeout=90)


def _in_own_mounts(settings, setup: str, argv: list[tuple[str, ...]]
                   ) -> list[subprocess.CompletedProcess[str]]:
    """Run `setup` (mounts over the home) then each gpuq command line, in a mount namespace
    of their own: the mounts vanish with it, whatever happens."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode != 0:
        if IN_CI:
            raise AssertionError("CI must allow `unshare -m` (root, or CAP_SYS_ADMIN)")
        pytest.skip("a mount namespace of its own needs root or CAP_SYS_ADMIN")
    out = []
    for args in argv:
        script = f"set -e\n{setup}\nexec {shlex.join([GPUQ, *args])}"
        out.append(subprocess.run(["unshare", "-m", "sh", "-c", script],
                                  env=server_env(settings), capture_output=True, text=True,
                                  timeout=90))
    return out


def _one_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_a_damaged_database_is_named_with_the_fix(sqlite_settings, tmp_path):
    assert _gpuq(sqlite_settings, "submit", "--", "true").returncode == 0
    database = sqlite_settings.home / "gpuq.db"
    database.write_bytes(b"not a database at all " * 1000)
    for args in _commands(tmp_path / "Procfile"):
        _one_line(_gpuq(sqlite_settings, *args), f"the database {database} is damaged",
                  f"mv {database} {database}.damaged")


def test_a_read_only_home_is_named_with_the_fix(sqlite_settings, tmp_path):
    home = sqlite_settings.home
    assert _gpuq(sqlite_settings, "submit", "--", "true").returncode == 0
    read_only = (f"mount --bind {shlex.quote(str(home))} {shlex.quote(str(home))}\n"
                 f"mount -o remount,bind,ro {shlex.quote(str(home))}")
    for result in _in_own_mounts(sqlite_settings, read_only, _commands(tmp_path / "Procfile")):
        _one_line(result, f"GPUQ_HOME {home} cannot be written", "set GPUQ_HOME")


def test_a_full_disk_is_named_with_the_fix(sqlite_settings, tmp_path):
    home = sqlite_settings.home
    home.mkdir(parents=True, exist_ok=True)
    quoted = shlex.quote(str(home))
    # A small disk for the home: a database made on it, then the rest of it filled.
    full = (f"mount -t tmpfs -o size=2m,mode=0700 tmpfs {quoted}\n"
            f"{shlex.join([GPUQ, 'submit', '--', 'true'])} >/dev/null\n"
            f"dd if=/dev/zero of={quoted}/filler bs=4k 2>/dev/null || true")
    for result in _in_own_mounts(sqlite_settings, full, _commands(tmp_path / "Procfile")):
        _one_line(result, f"the disk of GPUQ_HOME {home} is full", "df -h")
