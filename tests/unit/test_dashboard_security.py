"""The dashboard is closed by default on one host: every request shows a token (loopback
included), a request for a foreign host name is refused (DNS rebinding), a change from
another origin or with a body a plain HTML form can send is refused, and every answer
carries the headers that keep it out of frames and unsniffed."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from app.core.identity import Actor, stack_owner
from app.core.procgroup import stop_groups
from app.dashboard import create_app, dashboard_token, login_url
from tests.support.dashboard_http import BASE_URL, bearer, dashboard_client
from tests.support.netutil import free_port
from tests.support.servers import as_other, server_env, until
from tests.unit.test_private_home import open_place  # noqa: F401

ORIGIN = BASE_URL  # the dashboard's own origin, as its pages send it
FOREIGN_HOSTS = ["evil.example", "evil.example:5556", "127.0.0.1:9999", "localhost:80",
                 "127.0.0.1.evil.example:5556", "[::2]:5556", "", "a b"]


@pytest.fixture
def app(settings, local):  # type: ignore[no-untyped-def]
    return create_app(settings, local)


@pytest.fixture
def browser(app) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    """A browser signed in the way a person signs in: the login address sets the cookie,
    and the cookie alone authenticates what follows."""
    with TestClient(app, base_url=BASE_URL) as http:
        token = dashboard_token(app.state.settings)
        assert http.get(f"/?token={token}", follow_redirects=False).status_code == 303
        assert http.cookies.get("gpuq_dashboard_token") == token
        yield http


def cancelled(local, job_id: int) -> bool:  # type: ignore[no-untyped-def]
    """True once a cancel reached the job (a waiting one ends, a started one stops)."""
    return local.call("job", job_id=job_id)["status"] in ("CANCELLING", "CANCELLED")


@pytest.mark.parametrize("path", ["/", "/jobs", "/partials/jobs", "/api/jobs", "/api/status",
                                  "/openapi.json", "/docs", "/static/dashboard.js"])
def test_every_route_without_the_token_is_401_even_from_loopback(app, path):
    with TestClient(app, base_url=BASE_URL, client=("127.0.0.1", 40000)) as http:
        response = http.get(path)
        assert response.status_code == 401, path
        assert response.json()["code"] == "unauthorized"
        wrong = http.get(path, headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401
        assert http.get(path, headers=bearer(app)).status_code == 200


def test_a_submit_without_the_token_runs_nothing(app, local):
    with TestClient(app, base_url=BASE_URL) as http:
        response = http.post("/api/jobs", json={"command": "touch /tmp/owned"},
                             headers={"Origin": ORIGIN})
    assert response.status_code == 401
    assert local.call("queue")["total"] == 0


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
def test_a_foreign_host_is_403_even_with_the_token(app, local, host):
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 reaches
    the dashboard with Host: evil.example; it is refused before anything else."""
    job = local.submit("sleep 60", gpus=0)
    with dashboard_client(app) as http:
        headers = {"Host": host}
        read = http.get("/api/jobs", headers=headers)
        submitted = http.post("/api/jobs", json={"command": "touch /tmp/owned"},
                              headers=headers)
        cancel = http.post(f"/api/jobs/{job.id}/cancel", headers=headers)
    for response in (read, submitted, cancel):
        assert response.status_code == 403
        assert response.json()["code"] == "forbidden"
        assert "GPUQ_DASHBOARD_HOSTS" in response.json()["message"]
    assert local.call("queue")["total"] == 1 and not cancelled(local, job.id)


@pytest.mark.parametrize("host", ["127.0.0.1:5556", "localhost:5556", "[::1]:5556",
                                  "LOCALHOST:5556"])
def test_the_loopback_names_on_its_port_are_answered(app, host):
    with dashboard_client(app) as http:
        assert http.get("/api/jobs", headers={"Host": host}).status_code == 200


def test_the_bind_address_and_named_hosts_are_answered(settings, local):
    settings = settings.model_copy(update={
        "dashboard_address": "10.1.2.3", "dashboard_hosts": "gpuq.example.org, proxy:8443"})
    app = create_app(settings, local)
    with dashboard_client(app) as http:
        def answer(host: str) -> int:
            return http.get("/api/jobs", headers={"Host": host}).status_code

        assert answer("10.1.2.3:5556") == 200
        assert answer("gpuq.example.org") == answer("gpuq.example.org:443") == 200
        assert answer("proxy:8443") == 200
        assert answer("proxy:8444") == answer("proxy") == answer("10.1.2.3:80") == 403


def test_a_malformed_host_setting_is_refused_naming_the_form(settings, local):
    from app.core.errors import GpuqError

    with pytest.raises(GpuqError, match="GPUQ_DASHBOARD_HOSTS takes NAME or NAME:PORT"):
        create_app(settings.model_copy(update={"dashboard_hosts": "ok, bad:port"}), local)


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "http://127.0.0.1:9999"},  # another server on this host
    {"Origin": "http://localhost.evil.example:5556"},
    {"Origin": "null"},  # a sandboxed frame or a data: page
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},  # localhost:OTHER is the same site
    {"Content-Type": "application/x-www-form-urlencoded"},
    {"Content-Type": "multipart/form-data; boundary=x"},
    {"Content-Type": "text/plain"},
], ids=lambda h: "-".join(h.values()))
def test_a_cross_site_cancel_is_403_and_the_job_is_not_cancelled(browser, local, headers):
    job = local.submit("sleep 60", gpus=0)
    body = b"x=1" if "Content-Type" in headers else None
    response = browser.post(f"/api/jobs/{job.id}/cancel", content=body, headers=headers)
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"
    assert not cancelled(local, job.id)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          None])
def test_a_submit_in_a_plain_or_form_body_is_403_and_nothing_is_queued(browser, local,
                                                                       content_type):
    """`<form enctype="text/plain">` can send a JSON-looking body from any page."""
    headers = {"Content-Type": content_type} if content_type else {}
    response = browser.post("/api/jobs", content=b'{"command": "touch /tmp/owned", "x": "="}',
                            headers=headers)
    assert response.status_code == 403
    assert "application/json" in response.json()["message"]
    assert local.call("queue")["total"] == 0


def test_the_pages_own_requests_still_change_state(browser, local):
    """What the page script sends: JSON from the dashboard's own origin."""
    own = {"Origin": ORIGIN, "Sec-Fetch-Site": "same-origin"}
    made = browser.post("/api/jobs", json={"command": "sleep 60", "gpus": 0}, headers=own)
    assert made.status_code == 201
    [job_id] = made.json()["job_ids"]
    cancel = browser.post(f"/api/jobs/{job_id}/cancel", json={}, headers=own)
    assert cancel.status_code == 200 and job_id in (
        cancel.json()["cancelled"] + cancel.json()["cancelling"])
    assert cancelled(local, job_id)


@pytest.mark.parametrize(("path", "status"), [
    ("/", 200), ("/api/jobs", 200), ("/static/dashboard.js", 200), ("/api/jobs/12345", 404),
    ("/docs", 200), ("/openapi.json", 200)])
def test_every_answer_carries_the_security_headers(app, path, status):
    with dashboard_client(app) as http:
        answers = [http.get(path), http.get(path, headers={"Authorization": ""}),
                   http.get(path, headers={"Host": "evil.example"})]
    assert [r.status_code for r in answers] == [status, 401, 403]
    for response in answers:
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["x-frame-options"] == "DENY"
        policy = headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "script-src" not in policy or path == "/docs"


def test_the_token_file_is_private_and_kept_across_starts(settings, local):
    token = dashboard_token(settings)
    path = settings.home / "dashboard.token"
    assert path.read_text().strip() == token and len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.home.stat().st_mode) == 0o700
    path.chmod(0o644)
    assert dashboard_token(settings) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with TestClient(create_app(settings, local), base_url=BASE_URL,
                    headers={"Authorization": f"Bearer {token}"}) as http:
        assert http.get("/api/jobs").status_code == 200


def test_another_local_user_cannot_read_the_token(settings, other_user, open_place):  # noqa: F811
    """Even with the home under a directory everyone may enter, and a umask that would
    open what gpuq writes."""
    shared = settings.model_copy(update={"home": open_place / "home"})
    previous = os.umask(0o022)
    try:
        token = dashboard_token(shared)
    finally:
        os.umask(previous)
    path = shared.home / "dashboard.token"
    assert as_other(other_user, "ls", str(open_place)).returncode == 0  # the place is open
    seen = as_other(other_user, "cat", str(path))
    assert seen.returncode != 0 and token.encode() not in seen.stdout
    assert b"Permission denied" in seen.stderr


def test_a_token_file_it_cannot_read_is_one_line_naming_the_fix(settings, tmp_path):
    settings.home.mkdir(parents=True)
    (settings.home / "dashboard.token").mkdir()  # not a file: reading it fails
    out = subprocess.run([str(Path(sys.executable).parent / "gpuq"), "dashboard", "--url"],
                         env=server_env(settings), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "set GPUQ_DASHBOARD_TOKEN" in out.stderr and out.stdout == ""


def test_a_token_from_the_environment_wins_and_no_file_is_made(settings, local):
    given = settings.model_copy(update={"dashboard_token": "from-the-environment"})
    with TestClient(create_app(given, local), base_url=BASE_URL) as http:
        assert http.get("/api/jobs", headers={
            "Authorization": "Bearer from-the-environment"}).status_code == 200
    assert not (settings.home / "dashboard.token").exists()


def test_identify_names_the_actor_of_each_token(settings, local):
    """Tokens other than the dashboard's go to `identify` (named users)."""
    alice = Actor("alice")
    app = create_app(settings, local,
                     identify=lambda token: alice if token == "alice-token" else None)

    @app.get("/whoami")
    def whoami(request: Request) -> dict[str, object]:
        actor: Actor = request.state.actor
        return {"name": actor.name, "admin": actor.admin}

    with TestClient(app, base_url=BASE_URL) as http:
        def who(token: str) -> Any:
            return http.get("/whoami", headers={"Authorization": f"Bearer {token}"})

        assert who("alice-token").json() == {"name": "alice", "admin": False}
        owner = who(dashboard_token(settings)).json()
        assert owner == {"name": stack_owner().name, "admin": True}
        assert who("bob-token").status_code == 401


def _printed_address(log_path: Path) -> str | None:
    found = re.search(r"gpuq dashboard at (http://[^;\s]+);", log_path.read_text())
    return found.group(1) if found else None


def _answers_401(base: str) -> bool:
    try:
        return httpx.get(f"{base}/api/jobs", timeout=2).status_code == 401
    except httpx.HTTPError:
        return False


def test_gpuq_dashboard_prints_its_address_not_its_token_and_keeps_it_across_restarts(
        settings, tmp_path):
    """The real server on a real loopback socket: it prints where it answers but no token,
    no token is 401 even from 127.0.0.1, a foreign Host is 403 with the token, and the
    address `gpuq dashboard --url` prints signs a browser in."""
    gpuq = str(Path(sys.executable).parent / "gpuq")
    port = free_port()
    tokens = []
    for start in range(2):
        log_path = tmp_path / f"dashboard-{start}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([gpuq, "dashboard", "--port", str(port)],
                                    env=server_env(settings), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            printed = until(partial(_printed_address, log_path), 60,
                            describe=log_path.read_text)
            assert printed == base
            url = subprocess.run([gpuq, "dashboard", "--url", "--port", str(port)],
                                 env=server_env(settings), capture_output=True, text=True,
                                 timeout=60, check=True).stdout.strip()
            assert url.startswith(f"{base}/?token=")
            tokens.append(url.rpartition("=")[2])
            until(partial(_answers_401, base), 60, describe=log_path.read_text)
            assert tokens[-1] not in log_path.read_text(), "the token is never printed"
            with httpx.Client(base_url=base, timeout=10) as http:
                assert http.get("/api/jobs").status_code == 401
                auth = {"Authorization": f"Bearer {tokens[-1]}"}
                assert http.get("/api/jobs", headers=auth).status_code == 200
                assert http.get("/api/jobs", headers={**auth, "Host": "evil.example"}
                                ).status_code == 403
                login = http.get(url, follow_redirects=False)
                assert login.status_code == 303 and "httponly" in login.headers[
                    "set-cookie"].lower() and "samesite=strict" in login.headers[
                    "set-cookie"].lower()
                assert http.get("/api/jobs").status_code == 200  # the cookie it set
        finally:
            stop_groups([proc], grace_s=10)
    assert tokens[0] == tokens[1]
    assert (settings.home / "dashboard.token").read_text().strip() == tokens[0]


@pytest.mark.parametrize(("address", "shown"), [
    ("127.0.0.1", "127.0.0.1"), ("::1", "[::1]"), ("0.0.0.0", "127.0.0.1")])
def test_the_login_address_names_a_reachable_host_and_quotes_the_token(
        settings, local, address, shown):
    given = settings.model_copy(update={"dashboard_token": "a+b/c&d", "dashboard_address":
                                        address})
    url = login_url(given, "a+b/c&d")
    assert url == f"http://{shown}:5556/?token=a%2Bb%2Fc%26d"
    with TestClient(create_app(given, local), base_url=f"http://{shown}:5556") as http:
        assert http.get(url, follow_redirects=False).status_code == 303
        assert http.get("/api/jobs").status_code == 200
