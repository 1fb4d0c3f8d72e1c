"""Security: signed payloads and results, Redis passwords and TLS URLs, the embedded Redis
kept on loopback, and secret variables that reach the job and nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from celery.signals import before_task_publish
from sqlmodel import select

from app.celery_app import create_celery
from app.core import keys, payloads
from app.core.errors import (
    BrokerUnavailable,
    EmbeddedRedisExposed,
    PayloadError,
    PayloadNotAuthentic,
)
from app.core.security import NO_SECRET_WARNING, redis_ssl_options
from app.core.settings import Settings
from app.runtime import Runtime
from app.store.embedded_redis import EmbeddedRedis
from app.store.models import Job, JobEvent
from tests.support.netutil import free_port
from tests.support.servers import EXTERNAL_DB, PREFLIGHT_FAKES, Stack, server_env, until

SECRET = "correct horse battery staple"
KEY = "gpuq:payload:launch:0123456789abcdef"
GPUQ = str(Path(sys.executable).parent / "gpuq")


@pytest.fixture(scope="module")
def stack_settings(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Settings:
    """The module's stack runs with a shared secret."""
    from tests.support.servers import clean_servers

    clean_servers(redis_url)
    return Settings(home=tmp_path_factory.mktemp("secure-home"), redis_url=redis_url,
                    database_url=EXTERNAL_DB, hostname="e2e-security", fake_gpus=2,
                    kill_grace_s=1, heartbeat_s=1, monitor_interval_s=0.5, cpu_slots=1,
                    preflight_commands=PREFLIGHT_FAKES, secret=SECRET, log_level="INFO",
                    _env_file=None)


# -- payload authentication -----------------------------------------------------------------

def test_signed_payloads_verify_only_with_the_same_secret():
    data = payloads.pack({"command": "true"}, 2**20, SECRET, key=KEY)
    assert payloads.unpack(data, SECRET, key=KEY) == {"command": "true"}
    with pytest.raises(PayloadNotAuthentic, match="does not verify with GPUQ_SECRET"):
        payloads.unpack(data, "another secret", key=KEY)
    with pytest.raises(PayloadNotAuthentic, match="GPUQ_SECRET is not set here"):
        payloads.unpack(data, key=KEY)
    with pytest.raises(PayloadNotAuthentic, match=r"not signed.*GPUQ_SECRET"):
        payloads.unpack(payloads.pack({"command": "true"}, 2**20, key=KEY), SECRET, key=KEY)


def test_the_signature_covers_the_flags_so_a_signed_frame_cannot_be_downgraded():
    data = payloads.pack({"x": "y" * 10_000}, 2**20, SECRET, key=KEY)  # gzipped and signed
    flags = data[4]
    with pytest.raises(PayloadError):
        payloads.unpack(data[:4] + bytes([flags & ~payloads.GZIPPED]) + data[5:], SECRET,
                        key=KEY)
    with pytest.raises(PayloadError):  # unsigned now: its digest is no SHA-256 of the body
        payloads.unpack(data[:4] + bytes([flags & ~payloads.SIGNED]) + data[5:], key=KEY)


def _attack(kind: str, marker: Path, key: str) -> bytes:
    """What someone who can write to Redis but lacks the secret can store."""
    def forged(command: str) -> dict[str, str | None]:
        return {"kind": "command", "command": command, "rank_args": None}

    if kind == "unsigned":
        return payloads.pack(forged(f"touch {marker}"), 2**20, key=key)
    if kind == "other-secret":
        return payloads.pack(forged(f"touch {marker}"), 2**20, "guessed", key=key)
    # An honestly signed, harmless payload, its command edited in place.
    signed = payloads.pack(forged(f"ls -d {marker}"), 2**20, SECRET, key=key)
    assert b"ls -d" in signed
    return signed.replace(b"ls -d", b"touch")


@pytest.mark.e2e
@pytest.mark.parametrize("attack", ["unsigned", "other-secret", "tampered"])
def test_a_worker_refuses_a_payload_that_does_not_verify(client, stack_settings, tmp_path,
                                                         attack):
    marker = tmp_path / "ran"
    key = keys.new_payload()
    client.rt.redis.set(key, _attack(attack, marker, key), ex=600)
    out = client.call("launch", spec={"command": "forged", "payload_key": key, "gpus": 1},
                      num_jobs=1)
    row = client.wait(out["job_ids"], 60)[0]
    assert row["status"] == "FAILED"
    assert "payload refused" in row["reason"] and "GPUQ_SECRET" in row["reason"]
    assert not marker.exists(), "the refused payload's command never ran"


@pytest.mark.e2e
def test_signed_launches_and_results_work_and_a_tampered_result_is_refused(client):
    launched = client.launch("echo rank {rank}", 2, gpus=1)
    assert [r["status"] for r in launched.wait(60)] == ["SUCCEEDED"] * 2
    job = client.submit(sorted, [3, 1, 2], gpus=0)
    assert job.result(60) == [1, 2, 3]
    key = keys.result(job.id)
    stored = bytearray(client.rt.redis.get(key))
    assert stored[4] & payloads.SIGNED, "the worker signs the results it stores"
    stored[-1] ^= 0x01
    client.rt.redis.set(key, bytes(stored))
    with pytest.raises(PayloadNotAuthentic, match="GPUQ_SECRET"):
        job.result(5)


@pytest.mark.e2e
def test_the_secured_stack_does_not_warn_about_a_missing_secret(stack, client):
    client.submit("true", gpus=0).wait(60)
    for log in Path(stack.log_dir).glob("*.log"):
        assert NO_SECRET_WARNING not in log.read_text(errors="replace"), log


# -- secret environment variables -----------------------------------------------------------

@pytest.fixture
def published() -> list[str]:
    """Bodies of the Celery messages this process publishes while a test runs."""
    bodies: list[str] = []

    def keep(body: object = None, **_: object) -> None:
        bodies.append(json.dumps(body, default=str))

    before_task_publish.connect(keep, weak=False)
    yield bodies
    before_task_publish.disconnect(keep)


def _broker_text(r: redis.Redis) -> str:
    """Everything in Redis but the payloads: queues, unacked messages, results, keys."""
    parts = []
    for key in r.scan_iter(count=1000):
        name = key.decode()
        if name.startswith("gpuq:payload:"):
            continue
        kind = r.type(key).decode()
        if kind == "string":
            parts.append(repr(r.get(key)))
        elif kind == "list":
            parts.append(repr(r.lrange(key, 0, -1)))
        elif kind == "hash":
            parts.append(repr(r.hgetall(key)))
        elif kind in ("set", "zset"):
            parts.append(repr(r.zrange(key, 0, -1) if kind == "zset" else r.smembers(key)))
        parts.append(name)
    return "\n".join(parts)


@pytest.mark.e2e
def test_a_secret_reaches_the_job_and_nothing_else(remote_client, stack, stack_settings,
                                                   published, tmp_path):
    value = "s3cr3t-" + tmp_path.name
    r = remote_client.rt.redis
    # Both GPUs busy: the secret job waits PENDING while the broker is scanned.
    blockers = [remote_client.submit(f"sleep 30 # {i}", gpus=1) for i in range(2)]
    until(lambda: all(b.status == "RUNNING" for b in blockers), 60)
    job = remote_client.submit("echo the token is $API_TOKEN", gpus=1, env={"PLAIN": "seen"},
                               secrets={"API_TOKEN": value})
    assert job.status == "PENDING"
    assert value not in _broker_text(r)
    for blocker in blockers:
        blocker.cancel()
    assert job.wait(60) == "SUCCEEDED"

    assert f"the token is {value}" in job.logs(), "the job sees its secret"
    assert value not in _broker_text(r)
    assert published and not any(value in body for body in published)
    queue = subprocess.run([GPUQ, "queue", "--json"], env=server_env(stack_settings),
                           capture_output=True, text=True, timeout=60)
    assert str(job.id) in queue.stdout and value not in queue.stdout
    shown = remote_client.call("job", job_id=job.id)
    assert shown["env"] == {"PLAIN": "seen"} and value not in json.dumps(shown)
    with remote_client.rt.session() as session:
        stored = [repr(session.get(Job, job.id))] + [repr(e) for e in session.exec(
            select(JobEvent).where(JobEvent.job_id == job.id))]
    assert value not in "\n".join(stored)
    for log in Path(stack.log_dir).glob("*.log"):  # gpuq's own processes
        assert value not in log.read_text(errors="replace"), log
    from app.dashboard import create_app
    from tests.support.dashboard_http import dashboard_client

    with dashboard_client(create_app(stack_settings, remote_client)) as http:
        for path in (f"/api/jobs/{job.id}", "/api/jobs", f"/jobs/{job.id}"):
            page = http.get(path)
            assert page.status_code == 200 and value not in page.text, path


@pytest.mark.e2e
def test_cli_secret_from_the_environment_reaches_the_job(stack, stack_settings, client,
                                                         tmp_path):
    value = "from-env-" + tmp_path.name
    submitted = subprocess.run(
        [GPUQ, "submit", "--gpus", "0", "--secret", "DB_PASSWORD", "--secret", "MODE",
         "--", "bash", "-c", "echo $DB_PASSWORD $MODE"],
        env=server_env(stack_settings, DB_PASSWORD=value, MODE="quiet"), capture_output=True,
        text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    handle = client.job(int(submitted.stdout))
    assert handle.wait(60) == "SUCCEEDED"
    assert f"{value} quiet" in handle.logs()
    assert handle.row()["command"] == "bash -c 'echo $DB_PASSWORD $MODE'"
    missing = subprocess.run([GPUQ, "submit", "--secret", "NOT_EXPORTED_ANYWHERE", "--", "true"],
                             env=server_env(stack_settings), capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2
    assert "--secret NOT_EXPORTED_ANYWHERE: no such variable" in missing.stderr


# -- Redis passwords, TLS URLs, the embedded server's bind address -----------------------------

@pytest.fixture
def password_redis(tmp_path: Path):
    """A second embedded server that asks for a password."""
    settings = Settings(home=tmp_path / "pw", embedded_redis_password="p@ss:w/rd",
                        _env_file=None)
    server = EmbeddedRedis(settings)
    url = server.start()
    yield url
    server.stop()


def test_a_password_in_the_url_reaches_redis_and_celery(password_redis, tmp_path):
    assert password_redis.startswith("redis://:p%40ss%3Aw%2Frd@127.0.0.1:")
    settings = Settings(home=tmp_path / "c", redis_url=password_redis, _env_file=None)
    rt = Runtime(settings)
    try:
        assert rt.redis.ping()
        rt.celery.send_task("gpuq.dispatch", queue="pw-probe")
        assert rt.redis.llen("pw-probe") == 1, "Celery's broker connection authenticated"
        rt.celery.backend.set("gpuq-probe", b"1")
        assert rt.redis.get("gpuq-probe") == b"1", "so did its result backend"
    finally:
        rt.close()


@pytest.mark.parametrize("auth", ["", ":wrong@"])
def test_a_client_without_the_right_password_gets_a_clear_error(password_redis, tmp_path,
                                                                 auth):
    port = password_redis.rsplit(":", 1)[1]
    url = f"redis://{auth}127.0.0.1:{port}"
    rt = Runtime(Settings(home=tmp_path / "c", redis_url=url, _env_file=None))
    with pytest.raises(BrokerUnavailable, match="put its password in GPUQ_REDIS_URL") as e:
        rt.check_broker()
    assert "wrong" not in str(e.value), "the password is masked in the message"


@pytest.mark.parametrize(("settings_", "fix"), [
    ({"embedded_redis_bind": "0.0.0.0"}, "set GPUQ_EMBEDDED_REDIS_PASSWORD"),
    ({"embedded_redis_bind": "10.1.2.3", "embedded_redis_password": "pw"}, "set GPUQ_SECRET"),
])
def test_the_embedded_redis_refuses_to_listen_beyond_loopback_unprotected(tmp_path, settings_,
                                                                          fix):
    settings = Settings(home=tmp_path, _env_file=None, **settings_)
    with pytest.raises(EmbeddedRedisExposed, match=fix):
        EmbeddedRedis(settings).start()
    assert not (settings.redis_dir / "server.json").exists(), "nothing was started"


def test_the_embedded_redis_keeps_its_password_out_of_reach(password_redis, tmp_path):
    for name in ("server.json", "server.conf"):
        assert (tmp_path / "pw" / "redis" / name).stat().st_mode & 0o077 == 0, name


def test_a_rediss_url_gives_celery_its_tls_options():
    url = "rediss://:pw@redis.example:6380/0?ssl_cert_reqs=none&ssl_ca_certs=/etc/ca.pem"
    import ssl

    assert redis_ssl_options(url) == {"ssl_cert_reqs": ssl.CERT_NONE,
                                      "ssl_ca_certs": "/etc/ca.pem"}
    assert redis_ssl_options("rediss://h:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert redis_ssl_options("redis://h:6379/0") is None
    app = create_celery(Settings(_env_file=None), url)
    assert app.conf.broker_use_ssl == app.conf.redis_backend_use_ssl == redis_ssl_options(url)
    client = redis.Redis.from_url(url)
    assert client.connection_pool.connection_class is redis.SSLConnection


@pytest.fixture
def tls_redis(tmp_path: Path):
    """A Redis that speaks only TLS, with a self-signed certificate for 127.0.0.1; its URL
    names the certificate as the CA to trust."""
    import shutil

    missing = [tool for tool in ("redis-server", "openssl") if not shutil.which(tool)]
    if missing:
        why = f"a TLS Redis needs {' and '.join(missing)} (Debian: redis-server, openssl)"
        missing(why)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
         str(cert), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    try:
        until(lambda: _answers_ping(url), timeout_s=10)
        yield url, port
    finally:
        server.terminate()
        server.wait(timeout=10)


def _answers_ping(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def test_a_rediss_url_reaches_a_tls_redis_for_gpuq_and_celery(tls_redis, tmp_path):
    url, port = tls_redis
    rt = Runtime(Settings(home=tmp_path / "c", redis_url=url, _env_file=None))
    try:
        assert rt.redis.ping()
        rt.celery.send_task("gpuq.dispatch", queue="tls-probe", ignore_result=True)
        assert rt.redis.llen("tls-probe") == 1, "Celery's broker connection spoke TLS"
        rt.celery.backend.set("gpuq-probe", b"1")
        assert rt.redis.get("gpuq-probe") == b"1", "so did its result backend"
    finally:
        rt.close()
    # The same server refuses a plain connection: the URL's scheme is what turned TLS on.
    plain = Runtime(Settings(home=tmp_path / "p", redis_url=f"redis://127.0.0.1:{port}/0",
                             _env_file=None))
    with pytest.raises(BrokerUnavailable, match="cannot reach Redis"):
        plain.check_broker()
    plain.close()


def test_config_masks_the_secret_and_the_embedded_password():
    shown = Settings(secret="hunter2", embedded_redis_password="swordfish",
                     _env_file=None).masked()
    assert shown["secret"] == shown["embedded_redis_password"] == "****"


@pytest.mark.e2e
def test_without_a_secret_each_worker_says_once_that_redis_writers_can_run_code(
        stack_settings, tmp_path):
    from app.core import keys
    plain = stack_settings.model_copy(update={"hostname": "nosecret", "secret": None,
                                              "home": tmp_path / "home"})
    started = Stack(plain, tmp_path)
    started.start("worker", "control-worker")
    r = redis.Redis.from_url(plain.redis_url)
    try:
        until(lambda: all(r.exists(keys.alive("nosecret", i)) for i in range(2)), 60)
        until(lambda: "ready" in (tmp_path / "control-worker.log").read_text(), 60)
        time.sleep(1)  # every Celery child has started by now
        for name in ("worker", "control-worker"):
            text = (tmp_path / f"{name}.log").read_text(errors="replace")
            assert text.count(NO_SECRET_WARNING) == 1, (name, text[-2000:])
    finally:
        started.stop()
        r.close()
