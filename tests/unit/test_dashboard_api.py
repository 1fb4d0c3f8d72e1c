"""The dashboard's JSON API and pages through FastAPI's test client, on a real Redis and
database: the same answers as the operations layer, refusals as HTTP errors, a token when
it always asks for."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core import keys
from app.core.paths import JobPaths
from app.dashboard import create_app
from app.ops.registry import call_local
from app.stack.host import register_host
from app.stack.supervisor import read_procfile
from scheduler.worker.monitor import FakeProvider
from tests.support.dashboard_http import BASE_URL, dashboard_client
from tests.support.servers import ROOT, server_env


@pytest.fixture
def api(settings, local):
    with dashboard_client(create_app(settings, local)) as http:
        yield http


def test_jobs_page_matches_the_queue_operation_with_filters_paging_and_sort(api, rt, local):
    for i, priority in enumerate([5, -1, 3, 0]):
        local.submit(f"echo {i}", name="even" if i % 2 == 0 else "odd", priority=priority)

    page = api.get("/api/jobs", params={"limit": 2}).json()
    assert page["total"] == 4 and (page["limit"], page["offset"]) == (2, 0)
    assert page["jobs"] == call_local(rt, "queue", {"limit": 2})["jobs"]
    assert [r["command"] for r in page["jobs"]] == ["echo 3", "echo 2"]

    older = api.get("/api/jobs", params={"limit": 2, "offset": 2}).json()
    assert [r["command"] for r in older["jobs"]] == ["echo 1", "echo 0"]
    named = api.get("/api/jobs", params={"name": "even"}).json()
    assert named["total"] == 2 and {r["name"] for r in named["jobs"]} == {"even"}
    by_priority = api.get("/api/jobs", params={"sort": "-priority"}).json()["jobs"]
    assert [r["priority"] for r in by_priority] == [5, 3, 0, -1]
    assert [r["priority"] for r in api.get("/api/jobs", params={"sort": "priority"}).json()[
        "jobs"]] == [-1, 0, 3, 5]
    pending = api.get("/api/jobs", params={"status": "PENDING"}).json()
    assert pending["total"] == 4


@pytest.mark.parametrize("params", [{"status": "SLEEPING"}, {"sort": "colour"},
                                    {"limit": 0}, {"offset": -1}])
def test_bad_queue_parameters_are_refused(api, params):
    response = api.get("/api/jobs", params=params)
    assert response.status_code == 422


def test_one_job_has_its_events_and_its_secrets_masked(api, local):
    job = local.submit("python train.py", env={"API_TOKEN": "s3cret", "LR": "3e-4",
                                               "DB": "postgresql://u:pw0rd@db/x"})
    job.cancel()
    shown = api.get(f"/api/jobs/{job.id}").json()
    assert shown["env"] == {"API_TOKEN": "****", "LR": "3e-4", "DB": "postgresql://u:****@db/x"}
    assert [(e["from"], e["to"]) for e in shown["events"]] == [
        (None, "PENDING"), ("PENDING", "CANCELLED")]
    assert shown["status"] == "CANCELLED" and shown["command"] == "python train.py"
    page = api.get(f"/jobs/{job.id}").text
    assert "s3cret" not in page and "pw0rd" not in page and "API_TOKEN" in page


def test_unknown_ids_are_404_naming_the_fix(api):
    response = api.get("/api/jobs/999")
    assert response.status_code == 404
    assert response.json() == {"code": "job_not_found", "message": (
        "no job with id 999; `gpuq queue` lists the jobs there are")}
    assert api.post("/api/launches/999/cancel").json()["code"] == "launch_not_found"
    assert api.get("/jobs/999").status_code == 404


def test_launch_and_cancel_through_the_api(api, local):
    made = api.post("/api/launches", json={"command": "echo {rank}", "num_jobs": 3,
                                           "name": "sweep"})
    assert made.status_code == 201
    launch_id = made.json()["launch_id"]
    assert len(made.json()["job_ids"]) == 3
    row = api.get(f"/api/launches/{launch_id}").json()
    assert (row["counts"], row["done"], row["name"]) == ({"PENDING": 3}, 0, "sweep")

    cancelled = api.post(f"/api/launches/{launch_id}/cancel").json()
    assert cancelled == {"cancelled": made.json()["job_ids"], "cancelling": []}
    listed = api.get("/api/launches").json()["launches"]
    assert [(r["id"], r["counts"], r["done"]) for r in listed] == [
        (launch_id, {"CANCELLED": 3}, 3)]
    assert local.launch("echo more", num_jobs=1).counts() == {"PENDING": 1}


def test_submit_refuses_duplicates_and_bad_specs(api, local):
    first = api.post("/api/jobs", json={"command": "echo once", "gpus": 0})
    assert first.status_code == 201
    job_id = first.json()["job_ids"][0]
    assert local.job(job_id).row()["gpus"] == 0
    again = api.post("/api/jobs", json={"command": "echo once", "gpus": 0})
    assert again.status_code == 409
    assert again.json()["message"].startswith(f"an identical job {job_id} is already")
    assert api.post("/api/jobs", json={"command": "echo once", "gpus": 0,
                                       "allow_duplicate": True}).status_code == 201
    unknown = api.post("/api/jobs", json={"command": "x", "preflight": "vibes"})
    assert (unknown.status_code, unknown.json()["code"]) == (400, "invalid_job_spec")
    assert "unknown preflight 'vibes'; choose one of nccl" in unknown.json()["message"]
    assert api.post("/api/jobs", json={"command": "   "}).status_code == 422
    assert api.post("/api/jobs", json={"command": "x", "gpus": -1}).status_code == 422
    assert api.post("/api/jobs", json={"command": "x", "payload_key": "k"}).status_code == 422
    assert api.post("/api/jobs", json={"command": "x\u0000"}).status_code == 422
    assert local.call("queue")["total"] == 2


def test_logs_are_read_from_an_offset(api, local, settings):
    job = local.submit("echo hi")
    log = JobPaths(settings.home, job.id).log
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("first line\nsecond line\n")
    whole = api.get(f"/api/jobs/{job.id}/logs").json()
    assert whole == {"text": "first line\nsecond line\n", "offset": 23, "status": "PENDING",
                     "where": None}
    rest = api.get(f"/api/jobs/{job.id}/logs", params={"offset": 11}).json()
    assert rest["text"] == "second line\n"


def _events(lines) -> list[tuple[str, dict]]:  # type: ignore[no-untyped-def]
    found, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            found.append((name, json.loads(line.removeprefix("data: "))))
            if name == "end":
                return found
    return found


def test_log_stream_follows_a_growing_log_until_the_job_ends(api, local, settings):
    job = local.submit("sleep 100")
    log = JobPaths(settings.home, job.id).log
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("step 1\n")

    def grow_then_end() -> None:
        time.sleep(0.8)
        with open(log, "a") as f:
            f.write("step 2\n")
        time.sleep(0.8)
        job.cancel()

    writer = threading.Thread(target=grow_then_end)
    writer.start()
    with api.stream("GET", f"/api/jobs/{job.id}/logs/stream") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response.iter_lines())
    writer.join()
    assert events == [("log", {"text": "step 1\n", "offset": 7}),
                      ("log", {"text": "step 2\n", "offset": 14}),
                      ("end", {"status": "CANCELLED"})]
    assert api.get("/api/jobs/999/logs/stream").status_code == 404


def test_status_shows_gpus_readings_foreign_use_and_stale_workers(api, rt, local):
    register_host(rt, FakeProvider(2), "testhost")
    rt.redis.set(keys.alive("testhost", 0), 1, ex=30)
    rt.redis.set(keys.reading("testhost", 1), json.dumps({
        "index": 1, "name": "Fake GPU", "memory_used_mb": 30000, "memory_total_mb": 81920,
        "utilization_pct": 90, "process_count": 1, "mig": False, "foreign": True,
        "at": time.time()}))
    status = api.get("/api/status").json()
    [host] = status["hosts"]
    assert (host["host"], host["workers_alive"], host["stale"]) == ("testhost", 1, True)
    assert [g["alive"] for g in host["gpus"]] == [True, False]
    assert host["gpus"][1]["reading"]["foreign"] is True
    page = api.get("/gpus").text
    assert "foreign use" in page and "worker down" in page and "1/2 workers up" in page


def test_pages_render_the_overview_jobs_and_a_job(api, local):
    sweep = local.launch("echo {rank}", num_jobs=4, name="sweep-a")
    local.call("cancel", ids=sweep.job_ids[:1])
    overview = api.get("/").text
    assert "sweep-a" in overview and "1/4" in overview and "Cancel launch" in overview
    jobs = api.get("/jobs", params={"launch_id": sweep.id, "sort": "-id"}).text
    assert f'<tr data-job="{sweep.job_ids[-1]}">' in jobs
    assert jobs.index(f'data-job="{sweep.job_ids[-1]}"') < jobs.index(
        f'data-job="{sweep.job_ids[0]}"')
    assert api.get("/partials/jobs", params={"limit": 1}).text.count("<tr data-job") == 1
    job_page = api.get(f"/jobs/{sweep.job_ids[1]}").text
    assert "Cancel job" in job_page and "echo {rank}" in job_page
    assert f"/api/jobs/{sweep.job_ids[1]}/logs/stream" in job_page
    assert api.get("/jobs", params={"status": "NAPPING"}).status_code == 400


def test_a_given_token_guards_every_route(settings, local):
    guarded = settings.model_copy(update={"dashboard_token": "open-sesame"})
    with TestClient(create_app(guarded, local), base_url=BASE_URL) as http:
        assert http.get("/api/jobs").status_code == 401
        assert http.get("/api/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = http.get("/api/jobs", headers={"Authorization": "Bearer open-sesame"})
        assert ok.status_code == 200
        entry = http.get("/jobs?token=open-sesame&name=x", follow_redirects=False)
        assert entry.status_code == 303 and "token" not in entry.headers["location"]
        assert http.get("/api/status").status_code == 200  # the cookie it set


def test_the_dashboard_command_prints_the_login_address_with_its_token(settings):
    out = subprocess.run(
        [str(Path(sys.executable).parent / "gpuq"), "dashboard", "--url", "--port", "6001"],
        env=server_env(settings), capture_output=True, text=True, timeout=60, check=True)
    token = (settings.home / "dashboard.token").read_text().strip()
    assert out.stdout.strip() == f"http://127.0.0.1:6001/?token={token}"


def test_the_procfile_serves_the_dashboard():
    assert ("dashboard", "gpuq dashboard") in [
        (p.name, p.command) for p in read_procfile(ROOT / "Procfile")]


@pytest.mark.parametrize(("path", "body"), [
    ("/api/jobs", r'{"command": "echo", "name": "\ud800"}'),
    ("/api/jobs", r'{"command": "echo \udfff"}'),
    ("/api/launches", r'{"command": "echo", "num_jobs": 2, "env": {"A": "\ud800"}}'),
    ("/api/ops/queue", r'{"name": "\ud800"}'),
    ("/api/ops/submit", r'{"spec": {"command": "echo \ud800"}}'),
    ("/api/ops/cancel", r'{"name": "\ud800"}'),
])
def test_a_lone_surrogate_in_any_request_is_one_line_and_stores_nothing(api, local, path, body):
    # The JSON text itself spells the escape: json.dumps of a Python str would too.
    answer = api.post(path, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid_arguments"
    assert "not valid Unicode" in answer.json()["message"]
    assert local.call("queue")["total"] == 0


@pytest.mark.parametrize(("path", "body"), [
    ("/api/jobs", {"command": "echo", "workdir": "data/run1"}),
    ("/api/launches", {"command": "echo", "num_jobs": 2, "workdir": "."}),
    ("/api/ops/submit", {"spec": {"command": "echo", "workdir": "sub"}}),
    ("/api/ops/submit_many", {"origin": "api", "specs": [{"command": "echo",
                                                         "workdir": "sub"}]}),
])
def test_a_relative_workdir_from_the_api_is_refused_naming_the_fix(api, local, path, body):
    answer = api.post(path, json=body)
    assert answer.status_code == 400, answer.text
    assert "is relative" in answer.json()["message"]
    assert "absolute path" in answer.json()["message"]
    assert local.call("queue")["total"] == 0
    assert api.post("/api/jobs", json={"command": "echo", "workdir": "/tmp"}).status_code == 201


def test_a_damaged_database_is_a_503_naming_the_file_and_the_fix(settings):
    from app.client import Client

    own = settings.model_copy(update={"database_url": None})
    local = Client(own, "local")
    try:
        with dashboard_client(create_app(own, local), raise_server_exceptions=False) as api:
            assert api.get("/api/jobs").status_code == 200
            local.rt.engine.dispose()  # no connection left that read the file before
            (own.home / "gpuq.db").write_bytes(b"garbage " * 4096)
            answer = api.get("/api/jobs")
    finally:
        local.close()
    assert answer.status_code == 503, answer.text
    assert answer.json()["code"] == "database_corrupt"
    assert f"the database {own.home / 'gpuq.db'} is damaged" in answer.json()["message"]
