"""A server the supervisor did not start from a Procfile line (the embedded Redis) is
restarted all the same, and an exit that Redis could not take is recorded once it answers."""

from __future__ import annotations

import signal
import subprocess

import redis

from app.stack.supervisor import Program, Supervisor
from app.store.exits import RestartLog, recent_exits
from tests.support.servers import until


def test_an_adopted_server_that_dies_is_started_again_with_its_own_spawn(tmp_path):
    def sleeper() -> subprocess.Popen[bytes]:
        return subprocess.Popen(["sleep", "60"], start_new_session=True)

    exits: list[tuple[str, int]] = []
    sup = Supervisor([Program("steady", "sleep 60")], stop_grace_s=2,
                     on_exit=lambda name, code, _backoff: exits.append((name, code)))
    first = sleeper()
    sup.adopt(Program("server", "a server", stop_stage=2, spawn=sleeper), first)
    sup.start()
    try:
        assert sup.children[1].proc is first, "an adopted server is not started twice"
        first.send_signal(signal.SIGKILL)
        again = until(lambda: (sup.poll() or True) and (p := sup.children[1].proc) is not None
                      and p is not first and p)
        assert exits == [("server", -signal.SIGKILL)]
        assert again.poll() is None
    finally:
        sup.stop()
    assert again.poll() is not None, "stopped with its stage"


def test_an_exit_is_recorded_once_redis_answers_again(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    answering = False

    def connect() -> redis.Redis:
        if not answering:
            raise redis.ConnectionError("Connection refused")
        return client

    log = RestartLog(connect, "h1")
    log.RETRY_S = 0.05
    log("redis", -9, 0.5)  # Redis itself died: nothing can be written now
    assert recent_exits(client) == []
    answering = True
    exits = until(lambda: recent_exits(client))
    assert [(e["program"], e["exit_code"]) for e in exits] == [("redis", -9)]
    client.flushdb()
    client.close()
