"""What each face loads: a command or a client pays for what it uses, not for the whole of
gpuq (STYLE.md, "A package's `__init__` costs what it imports"; bench/startup_ratio.py
measures what it saves). Each check runs the real command or client in a fresh process and
reads its `sys.modules` at exit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli.main import COMMANDS, GROUPS, app_for, whole_app
from app.client import Client
from app.core.settings import Settings
from app.ops.registry import MODULES, load_all
from tests.support.netutil import free_port
from tests.support.servers import ROOT, server_env, until

# Loaded by no everyday command: the servers, the worker, Celery (until a message is sent),
# the migrations, and the commands and operations that were not asked for.
NEVER_ON_A_READ = {"celery", "kombu", "billiard", "alembic", "honcho", "uvicorn", "fastapi",
                   "flower", "app.stack", "app.dashboard", "scheduler.worker", "adapters",
                   "tasks", "app.cli.servers", "app.cli.db", "app.cli.users", "app.cli.report",
                   "app.cli.demo", "app.ops.submit", "app.ops.cancel", "app.ops.accounts"}
# What the stub dashboard below answers, by operation.
ANSWERS: dict[str, object] = {
    "queue": {"jobs": [], "total": 0},
    "launches": {"launches": [{"id": 7, "name": None, "num_jobs": 2, "command": "true",
                               "counts": {"SUCCEEDED": 2}, "done": 2, "owner": "ann"}]}}
# What a user reaching gpuq over its dashboard (GPUQ_URL) needs none of.
NEVER_OVER_HTTP = {"sqlalchemy", "sqlmodel", "alembic", "celery", "kombu", "billiard",
                   "redis", "tenacity", "typer", "rich", "app.runtime", "app.store",
                   "app.ops.registry", "app.ops.read", "scheduler"}
# What the owner's everyday commands need none of while the stack's dashboard answers on
# its socket: they load the CLI, the standard library's HTTP client and rich.
NEVER_NEARBY = NEVER_OVER_HTTP - {"typer", "rich"} | {
    "pydantic", "pydantic_settings", "app.core.settings", "app.ops.rows", "app.ops.submit"}

# Runs `gpuq ARGS` as the console script does, then prints the modules it loaded.
CLI_PROBE = ("import atexit, json, sys\n"
             "atexit.register(lambda: print('LOADED', json.dumps(sorted(sys.modules)),"
             " file=sys.stderr))\n"
             "sys.argv = ['gpuq', *sys.argv[1:]]\n"
             "from app.cli.main import main\n"
             "main()\n")


def loaded(stderr: str) -> set[str]:
    line = next(line for line in stderr.splitlines() if line.startswith("LOADED "))
    return set(json.loads(line.removeprefix("LOADED ")))


def among(modules: set[str], names: set[str]) -> list[str]:
    """Those of `names` loaded, a package counting as loaded when any module of it is."""
    return sorted(n for n in names if any(m == n or m.startswith(n + ".") for m in modules))


def gpuq_loads(settings: Settings, *args: str) -> tuple[subprocess.CompletedProcess[str],
                                                        set[str]]:
    done = subprocess.run([sys.executable, "-c", CLI_PROBE, *args], env=server_env(settings),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr.partition("LOADED")[0]
    return done, loaded(done.stderr)


@pytest.fixture
def waiting(local) -> int:
    """A stored job waiting for a GPU (no worker runs): the database is made and current,
    so that no command below loads the migrations that make a fresh one."""
    return int(local.submit("true", name="waits").id)


def test_gpuq_queue_loads_only_the_reads(waiting, settings):
    job = waiting
    # When `gpuq queue` runs as a user runs it
    done, modules = gpuq_loads(settings, "queue")
    # Then it shows the job, and loaded neither Celery nor another command's code
    assert f"{job}" in done.stdout and "waits" in done.stdout
    assert among(modules, NEVER_ON_A_READ) == []
    assert among(modules, {"app.ops.shares"}) == []


def test_a_page_with_no_waiting_job_loads_no_redis(waiting, settings):
    # When the page holds no PENDING job (only those ask Redis why they wait)
    done, modules = gpuq_loads(settings, "queue", "--status", "SUCCEEDED")
    # Then redis-py was never loaded
    assert "0 of 0 jobs" in done.stdout, done.stdout
    assert among(modules, {"redis", *NEVER_ON_A_READ}) == []


def test_gpuq_status_loads_only_the_reads(waiting, settings):
    # When `gpuq status` runs
    done, modules = gpuq_loads(settings, "status")
    # Then it counts the job, and loaded neither Celery nor another command's code
    assert "PENDING" in done.stdout, done.stdout
    assert among(modules, NEVER_ON_A_READ) == []


def test_gpuq_submit_that_sends_no_message_loads_no_celery(waiting, local, settings):
    # Given no worker, so that nothing can be placed and no run message is sent
    _, modules = gpuq_loads(settings, "submit", "--name", "stored-only", "--", "echo", "hi")
    # Then the job is stored, and Celery was never loaded
    assert local.call("queue", name="stored-only")["total"] == 1
    assert among(modules, {"celery", "kombu", "billiard", "alembic", "app.cli.servers",
                           "app.ops.cancel", "app.ops.accounts"}) == []


class _Dashboard(BaseHTTPRequestHandler):
    """Answers the operations a client over HTTP asks for as the dashboard's API does."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps(ANSWERS[self.path.rsplit("/", 1)[1]]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def dashboard_url() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Dashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_the_http_client_loads_no_database_redis_or_celery(dashboard_url, tmp_path):
    # Given a named user's client of a dashboard
    probe = ("import json, sys\n"
             "from app.client import Client\n"
             "client = Client()\n"
             "assert client.transport == 'http', client.transport\n"
             "launch = client.wait_launch(7)\n"
             "print(launch.done, client.rows([1, 2]), client.launch_rows(7))\n"
             "print('LOADED', json.dumps(sorted(sys.modules)), file=sys.stderr)\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path),
           "GPUQ_HOME": str(tmp_path / "home"), "GPUQ_URL": dashboard_url,
           "GPUQ_TOKEN": "a-token"}
    # When it reads a launch, its rows and their pages
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    # Then it got the answers, and loaded neither the database, Redis nor Celery
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "[]", "[]"]
    assert among(loaded(done.stderr), NEVER_OVER_HTTP) == []


def test_every_operation_is_listed_with_its_module():
    operations = load_all()
    assert {name: fn.__module__ for name, fn in operations.items()} == MODULES


def test_each_command_alone_is_the_same_command_as_in_the_whole_app():
    runner = CliRunner()
    whole = whole_app()
    names = [info.name or info.callback.__name__.replace("_", "-")
             for info in whole.registered_commands if info.callback is not None]
    assert sorted(names) == sorted(COMMANDS)
    assert sorted(g.name for g in whole.registered_groups if g.name) == sorted(GROUPS)
    for name in [*COMMANDS, *GROUPS]:
        alone = runner.invoke(app_for([name, "--help"]), [name, "--help"])
        assert alone.exit_code == 0, alone.output
        assert alone.output == runner.invoke(whole, [name, "--help"]).output, name


@pytest.fixture
def stack_dashboard(settings, tmp_path) -> Iterator[tuple[Settings, subprocess.Popen[bytes]]]:
    """The stack's dashboard as a real process, on a home short enough for its socket; its
    settings, and the process."""
    home = Path(tempfile.mkdtemp(prefix="gq-"))
    own = settings.model_copy(update={"home": home, "dashboard_port": free_port()})
    log = tmp_path / "dashboard.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", "from app.cli.main import main; main()", "dashboard"],
            env=server_env(own), cwd=ROOT, start_new_session=True, stdout=out, stderr=out)
    try:
        until(lambda: _answers(home / "dashboard.sock") or process.poll() is not None,
              timeout_s=120, describe=lambda: "the dashboard's socket never answered")
        assert process.poll() is None, log.read_text()
        yield own, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        shutil.rmtree(home, ignore_errors=True)


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _as_the_owner(settings: Settings, *args: str, **extra: str) -> tuple[str, set[str]]:
    """`gpuq ARGS` as the stack's owner runs it in a shell: GPUQ_TRANSPORT unset."""
    env = server_env(settings, **extra)
    del env["GPUQ_TRANSPORT"]
    done = subprocess.run([sys.executable, "-c", CLI_PROBE, *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr.partition("LOADED")[0]
    return done.stdout, loaded(done.stderr)


def test_everyday_commands_reach_the_running_stack_over_its_socket(stack_dashboard):
    own, dashboard = stack_dashboard
    # When the owner submits a job and reads the queue and the status, the stack up
    out, submitting = _as_the_owner(own, "submit", "--name", "near", "--", "echo", "hi")
    job = int(out)
    listed, queueing = _as_the_owner(own, "queue")
    status, statusing = _as_the_owner(own, "status")
    # Then the job is stored and shown, and none of them loaded the database, Redis,
    # pydantic or the settings: the stack's dashboard answered them
    assert _name_of(own, job) == "near"
    assert f"{job}" in listed and "near" in listed, listed
    assert "PENDING 1" in status, status
    for modules in (submitting, queueing, statusing):
        assert among(modules, NEVER_NEARBY) == []
    # When the dashboard's token is not the one the command shows
    listed, modules = _as_the_owner(own, "queue", GPUQ_DASHBOARD_TOKEN="another")
    # Then the command ran in process, with the same answer
    assert f"{job}" in listed and "near" in listed, listed
    assert among(modules, {"sqlalchemy", "app.core.settings"}) != []
    # When the dashboard is killed, its socket left behind
    os.killpg(dashboard.pid, signal.SIGKILL)
    dashboard.wait()
    assert (own.home / "dashboard.sock").exists()
    # Then the commands run in process, with the same answers
    listed, modules = _as_the_owner(own, "queue")
    assert f"{job}" in listed and "near" in listed, listed
    assert among(modules, {"sqlalchemy", "app.core.settings"}) != []
    out, _ = _as_the_owner(own, "submit", "--name", "after", "--", "echo", "again")
    assert _name_of(own, int(out)) == "after"


def _name_of(settings: Settings, job_id: int) -> str:
    check = Client(settings, "local")
    try:
        return str(check.rows([job_id])[0]["name"])
    finally:
        check.close()
