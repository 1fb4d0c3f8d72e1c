"""A secret given with `--secret` reaches its job and appears nowhere else: not in any file
under GPUQ_HOME (the database, the embedded Redis's append-only and snapshot files, gpuq's
own logs, the job's log and scripts), not in `ps` while the job runs, not in any Redis
value, and not in the job's environment but as the one variable it asked for; and the job
inherits no GPUQ_* setting of its worker.

Run on a whole stack of its own (embedded Redis and SQLite under its GPUQ_HOME): in process
without GPUQ_SECRET (the stack's own sealing key), and over the broker with GPUQ_SECRET and
an attachable (tmux) job.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from app.core.job_env import JOB_VARIABLES
from app.core.settings import Settings
from app.store.embedded_redis import EmbeddedRedis
from tests.support.servers import PREFLIGHT_FAKES, Stack, missing, server_env, until

pytestmark = pytest.mark.e2e
GPUQ = str(Path(sys.executable).parent / "gpuq")


def _every_file(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.is_file() and not p.is_symlink()]


def _redis_values(r: redis.Redis) -> list[bytes]:
    """Every key, its value as read (whatever its type) and as serialized (DUMP)."""
    found: list[bytes] = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key).decode()  # type: ignore[union-attr]
        read = {"string": lambda k: r.get(k), "list": lambda k: r.lrange(k, 0, -1),
                "hash": lambda k: r.hgetall(k), "set": lambda k: r.smembers(k),
                "zset": lambda k: r.zrange(k, 0, -1), "stream": lambda k: r.xrange(k)}
        found += [key, repr(read[kind](key) if kind in read else None).encode(),
                  bytes(r.dump(key) or b"")]  # type: ignore[arg-type]
    return found


@pytest.mark.parametrize("mode", ["local", "remote-tmux"])
def test_a_secret_appears_nowhere_but_in_its_job(tmp_path: Path, mode: str):
    if mode == "remote-tmux" and not shutil.which("tmux"):
        missing("tmux is not installed")
    value = f"MyT0ken-{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:20]}"
    home, outside = tmp_path / "home", tmp_path / "outside"
    outside.mkdir()
    server = EmbeddedRedis(Settings(home=home, _env_file=None))
    url = server.start()
    settings = Settings(home=home, redis_url=url, hostname=f"nowhere-{mode}", fake_gpus=1,
                        kill_grace_s=1, heartbeat_s=1, preflight_commands=PREFLIGHT_FAKES,
                        transport="local" if mode == "local" else "remote",
                        secret=None if mode == "local" else "a shared secret for the test",
                        _env_file=None)
    dump, release = outside / "env.dump", outside / "release"
    try:
        with Stack(settings, home).up(gpus=1):
            # Given a job that dumps its environment and waits to be released
            script = (f"env -0 > {dump}; printf %s \"$MYTOKEN\" | sha256sum; "
                      f"while [ ! -e {release} ]; do sleep 0.1; done")
            tmux = ["--tmux"] if mode == "remote-tmux" else []
            submitted = subprocess.run(
                [GPUQ, "submit", "--secret", "MYTOKEN", *tmux, "--", "bash", "-c", script],
                env=server_env(settings, MYTOKEN=value), capture_output=True, text=True,
                timeout=120)
            assert submitted.returncode == 0, submitted.stderr
            job_id = int(submitted.stdout)
            r = redis.Redis.from_url(url)
            until(lambda: dump.exists() and dump.stat().st_size > 0, 90)

            # While it runs, no process shows the value, nor does Redis hold it
            ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True,
                                check=True).stdout
            assert value not in ps
            assert not any(value.encode() in v for v in _redis_values(r))
            if mode == "remote-tmux":
                assert not (home / "logs" / f"{job_id}.tmux.sh").exists() or value not in (
                    home / "logs" / f"{job_id}.tmux.sh").read_text()

            release.touch()
            log = home / "logs" / f"{job_id}.log"
            until(lambda: hashlib.sha256(value.encode()).hexdigest() in log.read_text(), 60)
            until(lambda: not any(home.glob(f"logs/{job_id}.tmux.*")), 60)
            assert not any(value.encode() in v for v in _redis_values(r))
            r.close()

        # Then the job saw its secret, and nothing of its worker's settings
        env = dict(entry.split("=", 1) for entry in dump.read_text().split("\0") if entry)
        assert env.pop("MYTOKEN") == value
        assert not any(value in k or value in v for k, v in env.items())
        assert {k for k in env if k.startswith("GPUQ_")} <= set(JOB_VARIABLES)
        assert env["GPUQ_JOB_ID"] == str(job_id)
    finally:
        subprocess.run(["tmux", "-S", str(settings.tmux_socket), "kill-server"],
                       capture_output=True)
        server.stop()  # its append-only file is read as it was written, every command in it
    # And no file under GPUQ_HOME holds the value: the database, Redis's files, logs
    files = _every_file(home)
    assert any(".aof" in p.name for p in files), "the append-only file was read"
    for path in files:
        assert value.encode() not in path.read_bytes(), path
