"""The dashboard in a real headless browser (Debian's chromium driven by Playwright) over a
real stack: GPU workers on fake GPUs, the control worker, beat, and `gpuq dashboard`."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.client import Client
from app.core.procgroup import stop_groups
from app.core.settings import Settings
from app.dashboard import dashboard_token
from scheduler.worker.monitor import write_fake_foreign_use
from tests.support.servers import IN_CI, server_env, until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists() and not IN_CI:
    pytest.skip("no /usr/bin/chromium here (apt-get install chromium); CI installs it",
                allow_module_level=True)

# Replica r prints five steps, 0.4 s apart, on its GPU.
STEPS = ("import os, time; r = int(os.environ['GPUQ_JOB_RANK']); "
         "[print(f'rank {r} step {i} on GPU {os.environ[\"CUDA_VISIBLE_DEVICES\"]}', "
         "flush=True) or time.sleep(0.4) for i in range(5)]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def dashboard(stack, stack_settings: Settings) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """`gpuq dashboard` on a free loopback port; its base URL."""
    port = _free_port()
    log = open(stack_settings.home / "dashboard.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "gpuq"), "dashboard", "--port", str(port)],
        env=server_env(stack_settings), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    log.close()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/api/status", headers={
                "Authorization": f"Bearer {dashboard_token(stack_settings)}"},
                timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        until(up, 60)
        yield url
    finally:
        stop_groups([proc], grace_s=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Root in a container has no user namespaces for chromium's sandbox.
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                              args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, dashboard: str, stack_settings: Settings):  # type: ignore[no-untyped-def]
    """A page signed in as the owner signs in: by opening the login address once. Its
    pages must load and run under the dashboard's Content-Security-Policy."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(f"{dashboard}/?token={dashboard_token(stack_settings)}")
    assert page.url == f"{dashboard}/"  # the token left the address bar for the cookie
    yield page
    context.close()
    assert not [e for e in errors if "Content Security Policy" in e], errors


def _done(page, launch_id: int) -> int:  # type: ignore[no-untyped-def]
    text = page.locator(f"tr[data-launch='{launch_id}'] .progress-text").inner_text()
    return int(text.split("/")[0])


def test_overview_shows_a_running_launch_and_its_progress_moving(
        client: Client, dashboard: str, page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sweep = client.launch(["python", "-c", STEPS], num_jobs=6, name="browser-sweep")
    page.goto(dashboard + "/")
    row = page.locator(f"tr[data-launch='{sweep.id}']")
    assert "browser-sweep" in row.inner_text()
    first = _done(page, sweep.id)
    assert first < 6
    page.screenshot(path=tmp_path / "overview-running.png", full_page=True)

    # The page refreshes itself: no reload, and the bar's count moves.
    until(lambda: _done(page, sweep.id) > first, 60, 0.2)
    page.screenshot(path=tmp_path / "overview-progress.png", full_page=True)
    until(lambda: _done(page, sweep.id) == 6, 90, 0.3)
    assert "succeeded=6" in row.inner_text()
    assert row.locator(".seg.s-SUCCEEDED").count() == 1
    page.screenshot(path=tmp_path / "overview-done.png", full_page=True)


def test_a_job_opened_from_its_launch_shows_command_events_and_log(
        client: Client, dashboard: str, page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sweep = client.launch(["python", "-c", STEPS], num_jobs=2, name="browser-open",
                          env={"HF_TOKEN": "hf_s3cret", "LR": "3e-4"})
    page.goto(dashboard + "/")
    page.click(f"tr[data-launch='{sweep.id}'] a")
    page.wait_for_url(re.compile(rf"/jobs\?launch_id={sweep.id}"))
    page.screenshot(path=tmp_path / "jobs-of-launch.png", full_page=True)
    second = sweep.job_ids[1]
    page.click(f"tr[data-job='{second}'] td.num a")
    page.wait_for_url(re.compile(rf"/jobs/{second}$"))

    log = page.locator("#log")
    until(lambda: "rank 1 step 4" in log.inner_text(), 60, 0.2)
    until(lambda: "ended: SUCCEEDED" in page.locator("#log-state").inner_text(), 30, 0.2)
    assert "rank 1 step 0 on GPU" in log.inner_text()
    head = page.locator(".job-head")
    until(lambda: head.get_attribute("data-status") == "SUCCEEDED", 30, 0.2)
    timeline = page.locator(".timeline").inner_text()
    for state in ("PENDING", "STARTING", "RUNNING", "SUCCEEDED"):
        assert state in timeline
    env = page.locator("table.env").inner_text()
    assert "hf_s3cret" not in env and "HF_TOKEN" in env and "3e-4" in env
    command = page.locator("pre.command").inner_text()
    assert command.startswith("python -c ") and "GPUQ_JOB_RANK" in command
    page.screenshot(path=tmp_path / "job-log.png", full_page=True)


def test_cancelling_a_running_job_from_its_page_ends_it_cancelled(
        client: Client, dashboard: str, page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job = client.submit(["python", "-c", "import time\nfor i in range(600):\n"
                         "    print(f'working {i}', flush=True); time.sleep(0.5)"],
                        gpus=1, name="browser-long")
    page.goto(f"{dashboard}/jobs/{job.id}")
    head = page.locator(".job-head")
    until(lambda: head.get_attribute("data-status") == "RUNNING", 60, 0.2)
    until(lambda: "working 1" in page.locator("#log").inner_text(), 30, 0.2)
    page.screenshot(path=tmp_path / "job-running.png", full_page=True)

    dialogs: list[str] = []

    def accept(dialog) -> None:  # type: ignore[no-untyped-def]
        dialogs.append(dialog.message)
        dialog.accept()

    page.once("dialog", accept)
    page.click("button[data-cancel]")
    until(lambda: head.get_attribute("data-status") == "CANCELLED", 60, 0.2)
    assert dialogs == [f"Cancel job {job.id}?"]
    until(lambda: "ended: CANCELLED" in page.locator("#log-state").inner_text(), 30, 0.2)
    assert page.locator("button[data-cancel]").count() == 0
    assert job.status == "CANCELLED"
    assert "cancelled by user" in page.locator(".timeline").inner_text() or \
        "cancel requested" in page.locator(".timeline").inner_text()
    page.screenshot(path=tmp_path / "job-cancelled.png", full_page=True)


def test_a_declined_confirmation_cancels_nothing(
        client: Client, dashboard: str, page) -> None:  # type: ignore[no-untyped-def]
    job = client.submit(["sleep", "30"], gpus=0, priority=-5, name="browser-kept")
    page.goto(f"{dashboard}/jobs/{job.id}")
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.click("button[data-cancel]")
    page.wait_for_timeout(1500)
    assert job.status in ("PENDING", "STARTING", "RUNNING")
    job.cancel()


def test_gpus_page_shows_each_gpu_its_job_and_foreign_use(
        client: Client, stack_settings: Settings, dashboard: str, page,
        tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job = client.submit(["sleep", "60"], gpus=1, name="browser-gpu")
    until(lambda: job.status == "RUNNING", 60)
    held = job.row()["gpu_ids"][0]
    free = 1 - held
    page.goto(dashboard + "/gpus")
    host = page.locator(f"section[data-host='{stack_settings.hostname}']")
    assert host.locator("article.tile").count() == 2
    assert f"job {job.id}" in host.locator(f"article[data-gpu='{held}']").inner_text()
    write_fake_foreign_use(stack_settings.home, free, 30_000, 90)
    try:
        # The free GPU shows someone else's use once its worker has read it; no reload.
        tile = host.locator(f"article[data-gpu='{free}']")
        until(lambda: "foreign use" in tile.inner_text(), 30, 0.2)
        assert "mem 30000/81920 MiB" in tile.inner_text() and "util 90%" in tile.inner_text()
        page.screenshot(path=tmp_path / "gpus.png", full_page=True)
    finally:
        write_fake_foreign_use(stack_settings.home, free, 0, 0)
        job.cancel()
    until(lambda: "foreign use" not in host.inner_text(), 30, 0.2)


def test_overview_lists_a_failure_with_its_exit_code(
        client: Client, dashboard: str, page, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job = client.submit(["python", "-c", "import sys; print('diverged'); sys.exit(3)"],
                        gpus=0, name="browser-fails")
    job.wait(timeout_s=60)
    page.goto(dashboard + "/")
    failure = page.locator(f"table.failures tr[data-job='{job.id}']")
    assert "FAILED" in failure.inner_text()
    assert failure.locator(".exit-code").inner_text() == "3"
    page.screenshot(path=tmp_path / "overview-failure.png", full_page=True)
