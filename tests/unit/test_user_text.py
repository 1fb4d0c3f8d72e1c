"""Other users' text on a shared box: a terminal shows it with control characters escaped
and never as Rich markup, and the dashboard refuses a request body over its limit, by its
declared length or as it streams in."""

from __future__ import annotations

import pytest

from app.cli import render
from app.core.text import printable
from app.dashboard import create_app
from app.dashboard.limits import MAX_BODY_BYTES
from tests.support.dashboard_http import dashboard_client


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain name", "plain name"),
    ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),
    ("clear\x1b[2J", "clear\\x1b[2J"),
    ("two\nlines\ttab", "two\\nlines\\ttab"),
    ("abc\u202edcba", "abc\\u202edcba"),
    ("caf\u00e9 \u4e2d", "caf\u00e9 \u4e2d"),
])
def test_control_characters_print_escaped(raw, shown):
    assert printable(raw) == shown


def _row(**fields):  # type: ignore[no-untyped-def]
    row = {"id": 7, "name": None, "status": "PENDING", "gpus": 1, "gpu_ids": None,
           "host": None, "backend": "local", "backend_id": None, "priority": 0,
           "submitted_at": None, "started_at": None, "ended_at": None, "duration_s": None,
           "restart_count": 0, "command": "true", "launch_id": None, "rank": 0,
           "num_jobs": 1, "reason": None, "exit_code": None, "attempt": 0}
    row.update(fields)
    return row


def test_queue_and_launch_lines_show_names_and_commands_inert(local, monkeypatch):
    monkeypatch.setattr(render.console, "width", 300)
    hostile = "\x1b[2J[red]x[/red]\x1b]0;t\x07"
    with render.console.capture() as out:
        local.launch("true", num_jobs=1)
        render.queue_table([_row(name=hostile, host="h\x1b[1A")], 1)
    text = out.get()
    assert "\x1b[2J" not in text and "\x1b]0" not in text and "\x1b[1A" not in text
    assert "\\x1b[2J" in text
    assert "[red]x" in text  # shown as typed, not read as markup
    launches = local.call("launches")["launches"]
    launches[0]["name"], launches[0]["command"] = hostile, "echo [bold]\x1b[31mred"
    with render.console.capture() as out:
        render.launch_lines(launches)
    text = out.get()
    assert "\x1b[2J" not in text and "\x1b[31m" not in text
    assert "[bold]" in text and "\\x1b[31m" in text


@pytest.fixture
def api(settings, local):
    with dashboard_client(create_app(settings, local)) as http:
        yield http


def test_a_body_over_the_limit_is_refused_by_its_declared_length(api, rt):
    body = b'{"command": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
    response = api.post("/api/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert f"over {MAX_BODY_BYTES:,} bytes" in response.json()["message"]
    assert len(response.content) < 1000  # the body is not echoed back


def test_a_streamed_body_over_the_limit_is_refused_as_it_arrives(api):
    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"command": "'
        for _ in range(20):
            yield b"x" * (128 * 1024)
        yield b'"}'

    response = api.post("/api/jobs", content=chunks(),
                        headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "request_too_large" in response.text


def test_a_body_within_the_limit_is_taken(api):
    response = api.post("/api/jobs", json={"command": "true # " + "x" * 100_000})
    assert response.status_code in (200, 201), response.text
