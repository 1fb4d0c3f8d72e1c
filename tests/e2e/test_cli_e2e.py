"""The `gpuq` command as a user runs it: real processes, one-line errors, `gpuq up`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.settings import Settings
from app.store.embedded_redis import find_embedded
from tests.contract.test_adapters import slurm_missing
from tests.support.servers import (
    gpuq_up,
    missing,
    processes_with,
    server_env,
    until,
)

pytestmark = pytest.mark.e2e
GPUQ = str(Path(sys.executable).parent / "gpuq")


def gpuq(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GPUQ, *args], env=server_env(settings, **env), capture_output=True,
                          text=True, timeout=120, cwd=settings.home.parent)


def test_cli_runs_a_job_from_submit_to_logs(stack, stack_settings):
    submitted = gpuq(stack_settings, "submit", "--name", "cli-job", "--env", "WHO=cli", "--",
                     "bash", "-c", "echo hi from $WHO")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    waited = gpuq(stack_settings, "wait", job_id, "--timeout", "110")
    assert waited.returncode == 0, waited.stderr
    assert "hi from cli" in gpuq(stack_settings, "logs", job_id).stdout
    rows = json.loads(gpuq(stack_settings, "queue", "--name", "cli-job", "--json").stdout)
    assert rows["total"] == 1
    row = rows["jobs"][0]
    assert {"id", "name", "launch_id", "rank", "status", "exit_code", "gpus", "gpu_ids", "host",
            "submitted_at", "started_at", "ended_at", "restart_count"} <= set(row)
    assert (row["id"], row["status"], row["exit_code"]) == (int(job_id), "SUCCEEDED", 0)
    table = gpuq(stack_settings, "queue", "--name", "cli-job").stdout
    assert "cli-job" in table and "SUCCEEDED" in table


def test_cli_launch_wait_shows_progress_and_wait_fails_on_failure(stack, stack_settings):
    launched = gpuq(stack_settings, "launch", "-n", "3", "--wait", "--", "true")
    assert launched.returncode == 0, launched.stderr
    assert "3/3" in launched.stdout and "succeeded=3" in launched.stdout
    failing = gpuq(stack_settings, "submit", "--", "exit", "4").stdout.strip()
    waited = gpuq(stack_settings, "wait", failing, "--timeout", "60")
    assert waited.returncode == 1
    assert f"job {failing}: FAILED (exit 4)" in waited.stderr


def test_cli_cancel_a_launch_and_status(stack, stack_settings):
    launched = gpuq(stack_settings, "launch", "-n", "4", "--json", "--", "sleep", "30")
    out = json.loads(launched.stdout)
    cancelled = gpuq(stack_settings, "cancel", "--launch", str(out["launch_id"]), "--json")
    answer = json.loads(cancelled.stdout)
    assert sorted(answer["cancelled"] + answer["cancelling"]) == out["job_ids"]
    waited = gpuq(stack_settings, "wait", "--launch", str(out["launch_id"]), "--timeout", "60")
    assert waited.returncode == 1 and "CANCELLED" in waited.stderr
    status = json.loads(gpuq(stack_settings, "status", "--json").stdout)
    assert status["hosts"][0]["workers_alive"] == 2


@pytest.mark.parametrize(("args", "env", "message"), [
    (("cancel", "987654"), {}, "no job with id 987654"),
    (("logs", "987654"), {}, "no job with id 987654"),
    (("submit", "--gpus", "-2", "--", "true"), {}, "gpus"),
    (("submit", "--env", "NOEQUALS", "--", "true"), {}, "--env takes KEY=VALUE"),
    (("submit", "--", "true"), {"GPUQ_REDIS_URL": "redis://127.0.0.1:1/0"},
     "cannot reach Redis at redis://127.0.0.1:1/0"),
    (("queue",), {"GPUQ_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none"},
     "cannot reach the database"),
    (("queue",), {"GPUQ_FAKE_GPUS": "lots"}, "bad settings"),
    # A shell's `--name $'\\xff'`: bytes that are not UTF-8 reach gpuq as surrogates.
    (("submit", "--name", "\udcff", "--", "true"), {}, "holds bytes that are not UTF-8"),
    (("submit", "--", ""), {}, "the command is empty"),
    (("logs", str(2**64)), {}, f"no job with id {2**64}"),
    (("wait", "99999"), {}, "no job with id 99999"),
    (("wait", "--launch", "424242"), {}, "no launch with id 424242"),
    (("watch", "."), {}, "is a directory"),
    (("dashboard", "--port", "-1"), {}, "--port takes a TCP port number from 1 to 65535"),
])
def test_bad_input_gets_one_clear_line_and_changes_nothing(stack, stack_settings, args, env,
                                                           message):
    before = gpuq(stack_settings, "queue", "--json").stdout
    result = gpuq(stack_settings, *args, **env)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert gpuq(stack_settings, "queue", "--json").stdout == before


def test_unknown_option_and_non_integer_gpus_are_refused(stack, stack_settings):
    for args in (("submit", "--colour", "red", "--", "true"),
                 ("submit", "--gpus", "two", "--", "true")):
        result = gpuq(stack_settings, *args)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr


def test_config_masks_secrets(tmp_path):
    settings = Settings(home=tmp_path, redis_url="redis://u:topsecret@127.0.0.1:1/0",
                        _env_file=None)
    shown = gpuq(settings, "config").stdout
    assert "topsecret" not in shown and "****" in shown


def test_up_runs_the_stack_restarts_a_dead_worker_and_stops_everything(tmp_path):
    home = tmp_path / "up-home"
    # No GPUQ_REDIS_URL or GPUQ_DATABASE_URL, in every pass: the embedded server and SQLite
    # under its home, as on a fresh machine, shared with no other test.
    settings = Settings(home=home, redis_url=None, database_url=None, hostname="uphost",
                        fake_gpus=2, heartbeat_s=1, _env_file=None)
    with gpuq_up(settings, tmp_path, workers=2) as env:
        job = subprocess.run([GPUQ, "submit", "--", "echo", "up-ok"], env=env,
                             capture_output=True, text=True, timeout=60).stdout.strip()
        waited = subprocess.run([GPUQ, "wait", job, "--timeout", "60"], env=env, timeout=90)
        assert waited.returncode == 0

        worker = processes_with("-n gpu0@uphost")
        assert len(worker) == 1
        os.kill(worker[0], signal.SIGKILL)
        assert until(lambda: processes_with("-n gpu0@uphost") not in ([], worker), 30), \
            "the killed GPU worker came back"
    assert until(lambda: not processes_with(str(home)) and not processes_with("@uphost"), 10)
    assert find_embedded(settings) is None, "the embedded Redis was stopped"


def test_attach_to_a_job_not_started_with_tmux_names_the_fix(stack, stack_settings):
    job_id = gpuq(stack_settings, "submit", "--", "echo", "not-attachable").stdout.strip()
    result = gpuq(stack_settings, "attach", job_id)
    assert result.returncode == 2
    assert f"job {job_id} was not started with --tmux; read it with `gpuq logs`" in result.stderr


def test_launch_summary_lines_and_rank_substitution(stack, stack_settings):
    out = json.loads(gpuq(stack_settings, "launch", "-n", "3", "--name", "ranked", "--json",
                          "--", "echo", "rank={rank}/{num_jobs}").stdout)
    assert gpuq(stack_settings, "wait", "--launch", str(out["launch_id"]),
                "--timeout", "60").returncode == 0
    assert "rank=2/3" in gpuq(stack_settings, "logs", str(out["job_ids"][2])).stdout
    summary = gpuq(stack_settings, "launches").stdout
    assert f"launch {out['launch_id']} ranked: 3 jobs  succeeded=3" in summary
    table = gpuq(stack_settings, "queue", "--launch", str(out["launch_id"])).stdout
    assert f"launch {out['launch_id']} ranked" in table and "3 of 3 jobs" in table


@pytest.mark.parametrize("backend", ["process", "slurm"])
def test_submit_to_a_batch_backend_through_the_control_worker(stack, stack_settings, backend):
    if backend == "slurm" and (why := slurm_missing()):
        missing(why)
    submitted = gpuq(stack_settings, "submit", "--backend", backend, "--", "hostname")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    waited = gpuq(stack_settings, "wait", job_id, "--timeout", "110")
    assert waited.returncode == 0, waited.stderr
    row = json.loads(gpuq(stack_settings, "queue", "--json", "--limit", "200").stdout)
    job = next(r for r in row["jobs"] if r["id"] == int(job_id))
    assert job["backend"] == backend and job["backend_id"]
    # A terminal wide enough that the backend and its id share a line, whatever the id.
    table = gpuq(stack_settings, "queue", COLUMNS="240").stdout
    assert f"{backend} " in table
    if backend == "slurm":
        assert f"slurm {job['backend_id']}" in table, table
    assert os.uname().nodename in gpuq(stack_settings, "logs", job_id).stdout


def test_unknown_backend_names_the_choices(stack, stack_settings):
    result = gpuq(stack_settings, "submit", "--backend", "mainframe", "--", "true")
    assert result.returncode == 2
    assert ("unknown backend 'mainframe'; choose one of local, process, slurm, aws_batch, "
            "kubernetes") in result.stderr


def test_cli_job_after_another_starts_once_it_has_succeeded(stack, stack_settings):
    first = gpuq(stack_settings, "submit", "--name", "dep-first", "--", "sleep", "2")
    assert first.returncode == 0, first.stderr
    after = gpuq(stack_settings, "submit", "--after", first.stdout.strip(), "--gpus", "1",
                 "--", "echo", "after")
    assert after.returncode == 0, after.stderr
    waited = gpuq(stack_settings, "wait", after.stdout.strip(), "--timeout", "60")
    assert waited.returncode == 0, waited.stderr
    rows = {r["id"]: r for r in json.loads(
        gpuq(stack_settings, "queue", "--json", "--limit", "500").stdout)["jobs"]}
    before, then = rows[int(first.stdout)], rows[int(after.stdout)]
    assert then["started_at"] >= before["ended_at"], (before, then)
    # A job after one that failed is refused, naming the fix
    failed = gpuq(stack_settings, "submit", "--", "exit", "5").stdout.strip()
    gpuq(stack_settings, "wait", failed, "--timeout", "60")
    refused = gpuq(stack_settings, "submit", "--after", failed, "--", "true")
    assert refused.returncode == 2
    assert f"job {failed} ended FAILED" in refused.stderr and f"drop {failed}" in refused.stderr


def test_cancelling_an_ended_job_names_its_state_and_exits_non_zero(stack, stack_settings):
    job_id = gpuq(stack_settings, "submit", "--", "true").stdout.strip()
    assert gpuq(stack_settings, "wait", job_id, "--timeout", "110").returncode == 0
    cancelled = gpuq(stack_settings, "cancel", job_id)
    assert cancelled.returncode == 1
    assert f"job {job_id} already SUCCEEDED" in cancelled.stderr
    assert "Traceback" not in cancelled.stderr
