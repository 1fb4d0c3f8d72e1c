"""Nothing runs unsigned: with GPUQ_SECRET set, a raw `gpuq.op` or `gpuq.run` from a plain
Celery client runs nothing, a replayed operation is refused, a payload copied to another key
is refused, a result a job forged is never unpickled by a gpuq process, and a gzip bomb is
refused within bounded memory. Without a secret, workers refuse a Redis beyond loopback."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from celery.signals import before_task_publish
from sqlmodel import func, select

from app.client import Client
from app.core import keys, payloads, results, signing
from app.core.errors import (
    MessageNotAuthentic,
    NotPermitted,
    PayloadError,
    PayloadNotAuthentic,
    SecretRequired,
)
from app.core.identity import Actor
from app.core.keys import CONTROL_QUEUE
from app.core.security import redis_beyond_loopback, require_secret
from app.core.settings import Settings
from app.store.models import Job
from tests.support.servers import EXTERNAL_DB, PREFLIGHT_FAKES, Stack, server_env, until

SECRET = "the service's own secret"
ALICE = Actor("alice")  # a named user, not an admin: the flag is signed with the name
GPUQ = str(Path(sys.executable).parent / "gpuq")


# -- signed messages, unit by unit (real Redis for the nonces) ------------------------------

def test_a_signed_operation_runs_once_and_its_copy_is_refused(rt):
    auth = signing.sign(SECRET, signing.OP_PURPOSE, "queue", {"limit": 5}, ALICE)
    assert signing.verify_op(rt.redis, SECRET, "queue", auth) == (ALICE, {"limit": 5})
    with pytest.raises(MessageNotAuthentic, match="nonce was seen before"):
        signing.verify_op(rt.redis, SECRET, "queue", auth)


def test_a_stale_an_altered_or_a_foreign_operation_is_refused(rt):
    auth = signing.sign(SECRET, signing.OP_PURPOSE, "cancel", {"ids": [1]}, ALICE)
    with pytest.raises(MessageNotAuthentic, match=f"beyond {signing.OP_WINDOW_S} s"):
        signing.verify_op(rt.redis, SECRET, "cancel", auth,
                          now=auth["ts"] + signing.OP_WINDOW_S + 1)
    altered = [{**auth, "args": json.dumps({"ids": [2]})}, {**auth, "owner": "root"},
               {**auth, "admin": True}, {**auth, "ts": auth["ts"] + 1}]
    for message in altered:
        with pytest.raises(MessageNotAuthentic, match="does not verify"):
            signing.verify_op(rt.redis, SECRET, "cancel", message)
    with pytest.raises(MessageNotAuthentic, match="does not verify"):  # another operation
        signing.verify_op(rt.redis, SECRET, "submit", auth)
    with pytest.raises(MessageNotAuthentic, match="does not verify"):  # another secret
        signing.verify_op(rt.redis, "guessed", "cancel", auth)
    with pytest.raises(MessageNotAuthentic, match="not signed"):
        signing.verify_op(rt.redis, SECRET, "cancel", None)
    with pytest.raises(MessageNotAuthentic, match="GPUQ_SECRET is not set here"):
        signing.verify_op(rt.redis, None, "cancel", auth)
    assert signing.verify_op(rt.redis, SECRET, "cancel", auth)[0] == ALICE, \
        "refusals before the MAC verified used up no nonce"


def test_a_run_message_is_bound_to_its_job_and_attempt_and_to_its_purpose():
    *_, auth = signing.run_message(SECRET, 7, 2)
    assert signing.verify_run(SECRET, 7, 2, auth)
    assert signing.verify_run(SECRET, 7, 2, auth), "delivered again, it still verifies"
    with pytest.raises(MessageNotAuthentic, match="another job or attempt"):
        signing.verify_run(SECRET, 7, 3, auth)
    with pytest.raises(MessageNotAuthentic, match="another job or attempt"):
        signing.verify_run(SECRET, 8, 2, auth)
    with pytest.raises(MessageNotAuthentic, match="not signed"):
        signing.verify_run(SECRET, 7, 2, None)
    op = signing.sign(SECRET, signing.OP_PURPOSE, "run", [7, 2], ALICE)
    with pytest.raises(MessageNotAuthentic, match="does not verify"):
        signing.verify_run(SECRET, 7, 2, op)
    assert signing.run_message(None, 7, 2) == [7, 2]


# -- frames bound to their key and purpose ----------------------------------------------------

def test_a_signed_payload_copied_to_another_key_is_refused(rt):
    key = payloads.store(rt.redis, {"command": "true"}, 600, 2**20, secret=SECRET)
    other = keys.new_payload()
    rt.redis.set(other, rt.redis.get(key), ex=600)
    assert payloads.load(rt.redis, key, SECRET) == {"command": "true"}
    with pytest.raises(PayloadNotAuthentic, match=f"does not verify with GPUQ_SECRET for {other}"):
        payloads.load(rt.redis, other, SECRET)


def test_a_stored_result_is_never_accepted_as_a_payload_nor_as_another_jobs_result():
    data = results.MAGIC + b'{"ok": true}\n' + pickle.dumps(1)
    framed = payloads.frame(data, 2**20, SECRET, key=payloads.result_binding(4),
                            purpose=payloads.RESULT)
    assert results.load(framed, 4, SECRET)[0].ok
    with pytest.raises(PayloadNotAuthentic):
        payloads.unpack(framed, SECRET, key=keys.result(4))
    with pytest.raises(PayloadNotAuthentic):
        payloads.unpack(framed, SECRET, key=payloads.result_binding(4))
    with pytest.raises(PayloadNotAuthentic):
        results.load(framed, 5, SECRET)


def test_a_frame_of_the_previous_format_is_refused_by_name():
    with pytest.raises(PayloadError, match="stored by an older gpuq"):
        payloads.unpack(b"GPQ1" + bytes(40), key=keys.new_payload())


# -- bounded decompression --------------------------------------------------------------------

GIB = 2**30


@pytest.fixture(scope="module")
def bomb() -> tuple[bytes, int]:
    """A gzip stream of a little over 1 GiB of zeros (about 1 MB compressed)."""
    compressor = zlib.compressobj(9, wbits=16 + zlib.MAX_WBITS)
    chunk = bytes(2**24)
    size = GIB + 2**24
    parts = [compressor.compress(chunk) for _ in range(size // len(chunk))]
    return b"".join(parts) + compressor.flush(), size


def _frame(body: bytes, declared: int, key: str) -> bytes:
    """What someone who can write to Redis and has no secret can store: an unsigned frame
    with a correct checksum, declaring any length."""
    flags = payloads.GZIPPED
    digest = payloads._digest(payloads.PAYLOAD, key, flags, declared, body, None)
    return payloads._HEADER.pack(payloads.MAGIC, flags, declared, digest) + body


@pytest.mark.parametrize("declared", ["honest", "small", "at the limit"])
def test_a_gzip_bomb_is_refused_within_bounded_memory(bomb, declared):
    body, size = bomb
    assert len(body) < 2**21 and size > GIB
    key = keys.new_payload()
    limit = 2**21  # the stored limit: the frame is within it
    length = {"honest": size, "small": 4096,
              "at the limit": payloads.INFLATE_FACTOR * limit}[declared]
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError, match="refused"):
            payloads.unpack(_frame(body, length, key), limit_bytes=limit, key=key)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # zlib's output buffer grows by doubling: at most about twice what may be inflated.
    bound = 3 * len(body) + 3 * payloads.INFLATE_FACTOR * limit
    assert peak < bound < size // 8, (peak, bound)


# -- refusing to start without a secret beyond loopback -----------------------------------------

@pytest.mark.parametrize(("url", "beyond"), [
    (None, False), ("redis://127.0.0.1:6379/0", False), ("redis://localhost:6379", False),
    ("redis://[::1]:6379", False), ("unix:///run/redis.sock", False),
    ("redis://10.0.0.5:6379/0", True), ("rediss://redis.example:6380", True),
    ("sentinel://127.0.0.1:26379/0?master=m", True),
])
def test_redis_beyond_loopback_needs_the_secret(url, beyond):
    assert redis_beyond_loopback(url) is beyond
    settings = Settings(redis_url=url, _env_file=None)
    if beyond:
        with pytest.raises(SecretRequired, match="set the same GPUQ_SECRET"):
            require_secret(settings)
    else:
        require_secret(settings)
    require_secret(settings.model_copy(update={"secret": SECRET}))


@pytest.mark.parametrize("command", ["worker", "control-worker"])
def test_workers_refuse_to_start_on_a_redis_beyond_loopback_without_a_secret(tmp_path,
                                                                            command):
    settings = Settings(home=tmp_path, redis_url="redis://192.0.2.1:6379/0",
                        database_url=EXTERNAL_DB, fake_gpus=1, _env_file=None)
    started = subprocess.run([GPUQ, command], env=server_env(settings), capture_output=True,
                             text=True, timeout=120, cwd=tmp_path)
    assert started.returncode != 0
    assert "GPUQ_SECRET is not set and Redis (192.0.2.1) is reachable beyond this host" in \
        started.stdout + started.stderr


# -- a real stack with the secret: GPU and CPU workers, the control worker, no beat ------------

@pytest.fixture(scope="module")
def stack_settings(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Settings:
    from tests.support.servers import clean_servers

    clean_servers(redis_url)
    return Settings(home=tmp_path_factory.mktemp("signed-home"), redis_url=redis_url,
                    database_url=EXTERNAL_DB, hostname="e2e-signed", fake_gpus=2,
                    kill_grace_s=1, heartbeat_s=1, monitor_interval_s=0.5, cpu_slots=1,
                    preflight_commands=PREFLIGHT_FAKES, secret=SECRET, log_level="INFO",
                    _env_file=None)


@pytest.fixture(scope="module")
def stack(stack_settings: Settings) -> Iterator[Stack]:
    """No beat: nothing but the test sends a run message for a job the test routed."""
    from app.runtime import Runtime

    stack_settings.home.mkdir(parents=True, exist_ok=True)
    running = Stack(stack_settings, stack_settings.home)
    running.start("worker", "control-worker")
    rt = Runtime(stack_settings)
    try:
        running.wait_ready(rt, gpus=2)
        yield running
    finally:
        rt.close()
        running.stop()


@pytest.fixture
def raw(stack_settings: Settings) -> Iterator[Celery]:
    """A plain Celery client that knows only the Redis URL."""
    app = Celery("raw", broker=stack_settings.redis_url, backend=stack_settings.redis_url,
                 set_as_current=False)
    yield app
    app.close()


def _jobs(client: Client) -> int:
    with client.rt.session() as session:
        return int(session.exec(select(func.count()).select_from(Job)).one())


@pytest.mark.e2e
def test_a_raw_unsigned_operation_runs_nothing(stack, client, raw, tmp_path):
    marker = tmp_path / "ran"
    before = _jobs(client)
    answer = raw.send_task("gpuq.op", args=["submit", {"spec": {
        "command": f"touch {marker}", "gpus": 0}}], queue=CONTROL_QUEUE).get(timeout=60)
    assert answer["ok"] is False and answer["code"] == "message_not_authentic"
    assert "not signed" in answer["message"] and "GPUQ_SECRET" in answer["message"]
    forged = signing.sign("guessed", signing.OP_PURPOSE, "submit",
                          {"spec": {"command": f"touch {marker}", "gpus": 0}},
                          Actor("mallory", admin=True))
    answer = raw.send_task("gpuq.op", args=["submit", None, forged],
                           queue=CONTROL_QUEUE).get(timeout=60)
    assert answer["code"] == "message_not_authentic" and "does not verify" in answer["message"]
    assert _jobs(client) == before, "no job was made"
    assert not marker.exists()


@pytest.fixture
def published() -> Iterator[list[list[object]]]:
    """The arguments of the `gpuq.op` messages this process publishes."""
    sent: list[list[object]] = []

    def keep(body: object = None, headers: dict[str, object] | None = None, **_: object) -> None:
        if (headers or {}).get("task") == "gpuq.op":
            sent.append(list(body[0]))  # type: ignore[index]

    before_task_publish.connect(keep, weak=False)
    yield sent
    before_task_publish.disconnect(keep)


@pytest.mark.e2e
def test_a_replayed_operation_is_refused(stack, remote_client, client, raw, published,
                                         tmp_path):
    marker = tmp_path / "once"
    job = remote_client.submit(f"echo ran >> {marker}", gpus=0, allow_duplicate=True)
    assert job.wait(60) == "SUCCEEDED"
    (message,) = [m for m in published if m[0] == "submit"]
    assert message[1] is None and "echo ran" in message[2]["args"], "arguments only signed"
    before = _jobs(client)
    answer = raw.send_task("gpuq.op", args=message, queue=CONTROL_QUEUE).get(timeout=60)
    assert answer["code"] == "message_not_authentic" and "seen before" in answer["message"]
    assert _jobs(client) == before
    assert marker.read_text() == "ran\n"


@pytest.mark.e2e
def test_a_raw_unsigned_run_message_runs_nothing(stack, stack_settings, client, tmp_path):
    """The job is routed by a dispatcher without the secret (in this process): its run
    message reaches the real GPU worker unsigned."""
    marker = tmp_path / "ran"
    unsigned = Client(stack_settings.model_copy(update={"secret": None}), "local")
    try:
        job = unsigned.submit(f"touch {marker}", gpus=1)
        log = Path(stack.log_dir) / "worker.log"
        until(lambda: "gpuq.run message refused: it is not signed" in log.read_text(
            errors="replace"), 60)
        assert job.status == "STARTING", "the worker never claimed it"
        assert not marker.exists()
        job.cancel()
    finally:
        unsigned.close()


@pytest.mark.e2e
def test_a_payload_copied_under_another_key_is_refused(stack, remote_client, client,
                                                       tmp_path):
    marker = tmp_path / "ran"
    honest = remote_client.submit("true", gpus=0, secrets={"TOKEN": "x"})
    assert honest.wait(60) == "SUCCEEDED"
    signed_key = payloads.store(client.rt.redis, {
        "kind": "command", "command": f"touch {marker}", "rank_args": None}, 600, 2**20,
        secret=SECRET)
    copy = keys.new_payload()
    client.rt.redis.set(copy, client.rt.redis.get(signed_key), ex=600)
    out = client.call("launch", spec={"command": "copied", "payload_key": copy, "gpus": 0},
                      num_jobs=1)
    row = client.wait(out["job_ids"], 60)[0]
    assert row["status"] == "FAILED" and f"for {copy}" in row["reason"]
    assert not marker.exists()


class Boom:
    """Unpickled, it runs a command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def forge_result(marker: str, shape: str) -> None:
    """A function job that writes its own result file, then exits before the runner does."""
    path = sys.argv[sys.argv.index("--result-file") + 1]
    boom = pickle.dumps(Boom(f"touch {marker}"))
    # Bare: what gpuq's workers once unpickled; else the runner's format, its value a trap.
    data = boom if shape == "pickle" else results.MAGIC + b'{"ok": true}\n' + boom
    Path(path).write_bytes(data)
    os._exit(0)


@pytest.mark.e2e
@pytest.mark.parametrize("shape", ["pickle", "runner format"])
def test_a_result_forged_by_a_job_is_never_unpickled_by_a_worker(stack, client, tmp_path,
                                                                 shape):
    marker = tmp_path / "unpickled"
    job = client.submit(forge_result, str(marker), shape, gpus=1)
    state = job.wait(60)
    if shape == "pickle":
        assert state == "FAILED" and "not in the format of gpuq's runner" in job.row()["reason"]
    else:
        assert state == "SUCCEEDED"
    assert not marker.exists(), "a gpuq process unpickled what the job wrote"


def test_a_named_users_operations_travel_signed_and_keep_to_that_users_rights(
        stack, client, remote_client):
    # Given a job of the stack's owner, and the dashboard's remote client acting for alice
    theirs = client.call("submit", spec={"command": "sleep 30", "gpus": 0})["job_ids"][0]
    alice = remote_client.acting_for(ALICE)
    try:
        # When alice submits, lists and cancels through the control worker
        mine = alice.call("submit", spec={"command": "true", "gpus": 0})["job_ids"][0]
        listed = [row["id"] for row in alice.call("queue", limit=100)["jobs"]]
        # Then her job is hers, she sees only it, and the owner's job is out of her reach
        assert client.job(mine).row()["owner"] == "alice"
        assert mine in listed and theirs not in listed
        with pytest.raises(NotPermitted):
            alice.call("cancel", ids=[theirs])
        with pytest.raises(NotPermitted):
            alice.call("logs", job_id=theirs)
        alice.call("cancel", ids=[mine])
    finally:
        client.call("cancel", ids=[theirs])
