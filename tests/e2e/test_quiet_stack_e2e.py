"""`gpuq up` keeps its secrets off its output, which goes to terminals, CI logs and
journals: neither the Redis password nor the dashboard's token is printed on starting (the
dashboard says where to get its login address), and Flower, on loopback too, asks for the
password the stack generated for it."""

from __future__ import annotations

import secrets
from urllib.parse import quote

import httpx
import pytest

from app.core.settings import Settings
from tests.support.netutil import free_port
from tests.support.servers import gpuq_up, until

pytestmark = pytest.mark.e2e


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    try:
        return httpx.get(url, auth=auth, timeout=5).status_code
    except httpx.HTTPError:
        return 0  # not listening yet


@pytest.mark.timeout(300)
def test_up_prints_no_password_or_token_and_flower_asks_for_its_generated_password(tmp_path):
    redis_password = f"known-pw/{secrets.token_hex(8)}"
    settings = Settings(home=tmp_path / "home", redis_url=None, database_url=None,
                        hostname="quiethost", fake_gpus=1, heartbeat_s=1,
                        embedded_redis_password=redis_password, dashboard_port=free_port(),
                        flower_port=free_port(), _env_file=None)
    dashboard = f"http://127.0.0.1:{settings.dashboard_port}"
    flower = f"http://127.0.0.1:{settings.flower_port}/"
    log = tmp_path / "up.log"
    with gpuq_up(settings, tmp_path, workers=1, flower=True):
        until(lambda: _status(f"{dashboard}/api/jobs") == 401, 60, describe=log.read_text)
        assert until(lambda: _status(flower), 60, describe=log.read_text) == 401
        flower_password = (settings.home / "flower.password").read_text().strip()
        assert _status(flower, ("gpuq", flower_password)) == 200
    output = log.read_text()  # all of it, stop included
    token = (settings.home / "dashboard.token").read_text().strip()
    for secret in (redis_password, quote(redis_password, safe=""), token, flower_password):
        assert secret not in output
    assert (f"gpuq dashboard at {dashboard}; `gpuq dashboard --url` prints your login "
            "address") in output
