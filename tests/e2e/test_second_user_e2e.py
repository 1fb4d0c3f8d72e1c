"""A second user of the box reaches gpuq only with their own token, through a real
`gpuq dashboard` over a real worker stack: without a token they get 401; with it they submit,
list and cancel their own jobs, and can neither cancel nor read the log of the owner's job,
which their list does not show. As a second OS user (made here with useradd, acting through
runuser and curl) where the tests run as root; as a named user of the Python client's and
the CLI's http transport everywhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import Client
from app.core.errors import InvalidToken, NotPermitted
from app.core.identity import stack_owner
from app.core.procgroup import stop_groups
from app.core.settings import Settings
from tests.support.netutil import free_port
from tests.support.servers import missing, server_env, until

GPUQ = str(Path(sys.executable).parent / "gpuq")
OWNER_TOKEN = "owner-dashboard-token"


@pytest.fixture(scope="module")
def dashboard(stack, stack_settings: Settings) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """`gpuq dashboard` over the module's stack, asking for a token; its base URL."""
    port = free_port("127.0.0.1")
    log = open(stack_settings.home / "dashboard.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([GPUQ, "dashboard", "--port", str(port)],
                            env=server_env(stack_settings, GPUQ_DASHBOARD_TOKEN=OWNER_TOKEN),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/api/status", timeout=2,
                             headers={"Authorization": f"Bearer {OWNER_TOKEN}"}
                             ).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        until(up, 60, describe=lambda: f"the dashboard; see {stack_settings.home}")
        yield url
    finally:
        stop_groups([proc], grace_s=10)


def _add_user(settings: Settings, name: str) -> str:
    """`gpuq user add NAME --same-account`, as the stack's owner runs it: the token it
    prints."""
    added = subprocess.run([GPUQ, "user", "add", name, "--same-account"], env=server_env(settings),
                           capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    assert "shown only now" in added.stderr
    return added.stdout.strip()


@pytest.fixture(scope="module")
def alice(stack_settings: Settings, stack) -> str:  # type: ignore[no-untyped-def]
    return _add_user(stack_settings, "alice")


@pytest.fixture
def owners_job(client: Client) -> Iterator[int]:
    """A job of the stack's owner, running on a GPU until cancelled."""
    handle = client.submit("sleep 300", gpus=1, allow_duplicate=True)
    until(lambda: handle.status == "RUNNING", 60)
    yield handle.id
    handle.cancel()
    handle.wait(60)


def _status(client: Client, job_id: int) -> str:
    return str(client.call("job", job_id=job_id)["status"])


def test_a_named_user_works_through_the_python_clients_http_transport(
        dashboard, alice, owners_job, client):  # type: ignore[no-untyped-def]
    theirs = Client(Settings(url=dashboard, token=alice, _env_file=None))
    assert theirs.transport == "http"
    # They submit and see their own job run, its log included
    done = theirs.submit("echo hello from alice", gpus=0)
    assert done.wait(120) == "SUCCEEDED"
    assert done.logs().endswith("hello from alice\n")
    assert done.row()["owner"] == "alice"
    # Their queue shows only their own; the owner's is not theirs to read or cancel
    assert [r["id"] for r in theirs.call("queue")["jobs"]] == [done.id]
    for op, kwargs in (("logs", {"job_id": owners_job}), ("job", {"job_id": owners_job}),
                       ("cancel", {"ids": [owners_job]})):
        with pytest.raises(NotPermitted, match="belongs to another user"):
            theirs.call(op, **kwargs)
    assert _status(client, owners_job) == "RUNNING"
    # A function job needs the stack's Redis, which they do not reach: refused by name
    with pytest.raises(Exception, match="does not reach"):
        theirs.submit(print, "x")
    # A wrong token is refused as such
    with pytest.raises(InvalidToken, match="refused the token"):
        Client(Settings(url=dashboard, token=alice + "x", _env_file=None)).call("queue")


def test_the_cli_takes_the_users_token_from_a_private_file(
        dashboard, alice, tmp_path):  # type: ignore[no-untyped-def]
    token_file = tmp_path / "token"
    token_file.write_text(alice + "\n")
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUQ_")}
    env.update(GPUQ_URL=dashboard, GPUQ_TOKEN_FILE=str(token_file), GPUQ_HOME=str(tmp_path))

    def gpuq(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([GPUQ, *argv], env=env, capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)

    submitted = gpuq("submit", "--gpus", "0", "--name", "from-cli", "--", "true")
    assert submitted.returncode == 0, submitted.stderr
    listed = json.loads(gpuq("queue", "--json", "--name", "from-cli").stdout)
    assert {r["owner"] for r in listed["jobs"]} == {"alice"} and listed["total"] == 1
    token_file.chmod(0o644)
    refused = gpuq("queue")
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: the token file") and "chmod 600" in refused.stderr


# The second OS user


@pytest.fixture(scope="module")
def other_user(other_user: str) -> str:
    if not shutil.which("curl"):
        missing("the second user speaks HTTP with curl, which is not installed")
    return other_user


@pytest.fixture(scope="module")
def others_token(other_user: str, stack_settings: Settings, stack  # type: ignore[no-untyped-def]
                 ) -> Iterator[Path]:
    """The second user's token, in a 0600 file of theirs, as `gpuq user add` printed it."""
    place = Path(tempfile.mkdtemp(prefix="gpuq-other-"))
    shutil.chown(place, other_user)
    place.chmod(0o700)
    token = place / "token"
    token.write_text(_add_user(stack_settings, other_user) + "\n")
    shutil.chown(token, other_user)
    token.chmod(0o600)
    yield token
    shutil.rmtree(place, ignore_errors=True)


def _curl(user: str, method: str, url: str, token_file: Path | None = None,
          body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """curl as `user`; the token is read from their file by their own shell, never argv."""
    script = 'curl -sS -w "\\n%{http_code}" -X "$1" "$2"'
    if token_file is not None:
        script += ' -H "Authorization: Bearer $(cat "$3")"'
    if body is not None:
        script += ' -H "Content-Type: application/json" --data-binary "$4"'
    argv = ["runuser", "-u", user, "--", "sh", "-c", script, "sh", method, url,
            str(token_file or ""), json.dumps(body or {})]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    text, _, code = done.stdout.rpartition("\n")
    return int(code), json.loads(text) if text.strip().startswith(("{", "[")) else text


def test_a_second_os_user_touches_only_their_own_jobs_with_their_own_token(
        dashboard, other_user, others_token, owners_job, client):  # type: ignore[no-untyped-def]
    api = f"{dashboard}/api"
    # No token, or a made-up one: 401
    assert _curl(other_user, "GET", f"{api}/jobs")[0] == 401
    assert _curl(other_user, "POST", f"{api}/jobs/{owners_job}/cancel")[0] == 401
    # With theirs they submit a job, and it is theirs
    code, submitted = _curl(other_user, "POST", f"{api}/jobs", others_token,
                            {"command": "sleep 300", "gpus": 1})
    assert code == 201, submitted
    mine = submitted["job_ids"][0]
    assert client.call("job", job_id=mine)["owner"] == other_user
    # Their list holds their job and not the owner's
    code, page = _curl(other_user, "GET", f"{api}/jobs", others_token)
    assert code == 200 and [r["id"] for r in page["jobs"]] == [mine]
    # The owner's job: neither cancelled nor read, and it runs on
    code, refused = _curl(other_user, "POST", f"{api}/jobs/{owners_job}/cancel", others_token)
    assert (code, refused["code"]) == (403, "not_permitted")
    code, refused = _curl(other_user, "GET", f"{api}/jobs/{owners_job}/logs", others_token)
    assert (code, refused["code"]) == (403, "not_permitted")
    assert _curl(other_user, "POST", f"{api}/ops/logs", others_token,
                 {"job_id": owners_job})[0] == 403
    assert _status(client, owners_job) == "RUNNING"
    # Their own job they cancel
    code, cancelled = _curl(other_user, "POST", f"{api}/jobs/{mine}/cancel", others_token)
    assert code == 200 and mine in cancelled["cancelled"] + cancelled["cancelling"]
    until(lambda: _status(client, mine) == "CANCELLED", 60)
    # And the owner's own view shows both jobs with their owners
    rows = {r["id"]: r["owner"] for r in client.call("queue", ids=[mine, owners_job])["jobs"]}
    assert rows == {mine: other_user, owners_job: stack_owner().name}
