"""Bad input gets a clear error (a GpuqError naming the fix) and changes nothing already
accepted: the jobs file, the CLI, the JSON of remote operations, stored payloads."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlmodel import select
from typer.testing import CliRunner

from app.cli.main import cli
from app.core import keys, payloads
from app.core.backends import ADAPTERS
from app.core.errors import (
    GpuqError,
    InvalidArguments,
    InvalidJobSpec,
    JobsFileError,
    PayloadError,
    UnknownOperation,
)
from app.ops.registry import OPERATIONS, call_local
from app.store.models import Job, JobDependency, JobEvent, Launch
from scheduler.jobsfile import KNOWN, JobsFileWatcher, parse_line

FIXTURES = [HealthCheck.function_scoped_fixture]


def snapshot(rt) -> tuple[Any, ...]:
    """Everything accepted so far: rows of every table and every Redis key with its value."""
    with rt.session() as session:
        rows = tuple(tuple(sorted(o.model_dump().items(), key=str))
                     for table in (Job, JobEvent, Launch, JobDependency)
                     for o in session.exec(select(table)))
    r = rt.redis
    # Heartbeats, GPU readings, the batch syncs' pace (beat's) and Celery's control
    # bindings come and go on their own while any worker runs; they hold nothing a user
    # submitted.
    telemetry = (keys.alive("", 0).split(":")[:2], keys.reading("", 0).split(":")[:2])
    paces = {keys.batch_poll(backend).encode() for backend in ADAPTERS}
    return rows, {k: r.dump(k) for k in sorted(r.keys("*"))
                  if k.decode().split(":")[:2] not in telemetry and k not in paces
                  and not k.startswith(b"_kombu.binding")}


@pytest.fixture
def accepted(local, rt):
    """One job and one launch already accepted; the snapshot to compare with."""
    local.submit("echo accepted", gpus=1, name="accepted")
    local.launch("echo replica {rank}", 2, gpus=1)
    return snapshot(rt)


# -- the jobs file ------------------------------------------------------------------------

option_words = st.builds(lambda k, v: f"{k}={v}",
                         st.sampled_from([*KNOWN, "env.X", "gpus", "colour", ""]),
                         st.text(max_size=12))


@given(st.text(max_size=200))
def test_any_line_parses_to_a_valid_spec_or_a_numbered_error(line):
    try:
        spec = parse_line(line, 7)
    except JobsFileError as e:
        assert str(e).startswith("line 7: ")
        return
    assert spec is None or spec["command"].strip()


@given(st.lists(option_words, max_size=6), st.text(max_size=30))
def test_option_garbage_before_the_separator_is_refused_by_line(words, command):
    try:
        parse_line(" ".join(words) + " -- " + command, 3)
    except JobsFileError as e:
        assert e.lineno == 3 and str(e).startswith("line 3: ")


@pytest.mark.parametrize(("line", "message"), [
    ("gpus=two -- true", "gpus takes an integer, got 'two'"),
    ("colour=red -- true", "unknown option 'colour'; known:"),
    ("gpus -- true", "options are key=value before ` -- `"),
    ("name='unclosed -- true", "cannot read the options"),
    ("gpus=1 --", "the command is empty"),
    ("gpus=999 -- true", "gpus: Input should be less than or equal to 64"),
    ("env.=x -- true", "unknown option 'env.'"),
])
def test_a_bad_jobs_file_line_names_the_problem(line, message):
    with pytest.raises(JobsFileError, match="line 1: .*" + message.replace("(", r"\(")):
        parse_line(line, 1)


def test_bad_lines_in_a_watched_file_change_nothing_already_submitted(local, rt, tmp_path):
    path = tmp_path / "jobs.txt"
    path.write_text("gpus=1 -- echo one\n")
    watcher = JobsFileWatcher(path, lambda origin, specs: local.call(
        "submit_many", origin=origin, specs=specs))
    assert len(watcher.poll().submitted) == 1
    before = snapshot(rt)
    path.write_text("gpus=1 -- echo one\ngpus=x -- echo two\nbogus=1 -- three\n-- \n")
    result = watcher.poll()
    assert result.submitted == [] and len(result.errors) == 3
    assert [e.split(":")[0] for e in result.errors] == ["line 2", "line 3", "line 4"]
    assert snapshot(rt) == before


# -- the command line ---------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["submit", "--gpus", "-2", "--", "true"], "gpus: Input should be greater than or equal"),
    (["submit", "--gpus", "65", "--", "true"], "gpus: Input should be less than or equal to 64"),
    (["submit", "--env", "NOEQUALS", "--", "true"], "--env takes KEY=VALUE"),
    (["submit", "--env", "=value", "--", "true"], "--env takes KEY=VALUE"),
    (["submit", "--priority", "5000", "--", "true"], "priority: Input should be less than"),
    (["submit", "--max-restarts", "-1", "--", "true"], "max_restarts: Input should be"),
    (["submit", "--gpu-ids", "0,x", "--", "true"], "--gpu-ids takes comma-separated integers"),
    (["submit", "--recover-on-exit-codes", "137;143", "--", "true"],
     "--recover-on-exit-codes takes comma-separated integers"),
    (["submit", "--backend", "mainframe", "--", "true"], "unknown backend 'mainframe'"),
    (["submit", "--preflight", "astrology", "--", "true"], "unknown preflight 'astrology'"),
    (["submit", "--secret", "=x", "--", "true"], "--secret takes NAME=VALUE or NAME"),
    (["submit", "--secret", "GPUQ_TEST_UNSET_VARIABLE", "--", "true"], "no such variable"),
    (["launch", "-n", "0", "--", "true"], "--num-jobs must be between 1 and 100,000"),
    (["launch", "-n", "100001", "--", "true"], "split a larger sweep"),
    (["queue", "--status", "SLEEPY"], "unknown status 'SLEEPY'; choose one of"),
    (["queue", "--limit", "0"], "--limit must be between 1 and"),
    (["cancel"], "say what to cancel"),
    (["cancel", "987654"], "no job with id 987654"),
    (["logs", "987654"], "no job with id 987654"),
])
def test_bad_cli_input_is_a_gpuq_error_naming_the_fix_and_changes_nothing(
        accepted, rt, settings, args, message):
    result = CliRunner().invoke(cli, args, env=settings.as_environment())
    assert isinstance(result.exception, GpuqError), result.output
    assert message in str(result.exception)
    assert snapshot(rt) == accepted


@pytest.mark.parametrize("args", [
    ["submit", "--gpus", "two", "--", "true"],
    ["submit", "--priority", "high", "--", "true"],
    ["submit", "--colour", "red", "--", "true"],
    ["launch", "--", "true"],  # --num-jobs missing
])
def test_malformed_cli_options_are_usage_errors_and_change_nothing(accepted, rt, settings,
                                                                   args):
    result = CliRunner().invoke(cli, args, env=settings.as_environment())
    assert result.exit_code == 2, result.output
    assert snapshot(rt) == accepted


# -- the JSON of remote operations ----------------------------------------------------------

@pytest.mark.parametrize(("name", "kwargs", "error", "message"), [
    ("reboot", {}, UnknownOperation, "unknown operation 'reboot'; known: cancel"),
    (None, {}, UnknownOperation, "unknown operation None"),
    ("queue", ["limit", 5], InvalidArguments, "takes an object of named arguments, not list"),
    ("queue", "limit=5", InvalidArguments, "not str"),
    ("queue", {"limit": "many"}, InvalidArguments, "limit: Input should be a valid integer"),
    ("queue", {"offset": -1}, InvalidArguments, "offset counts rows to skip"),
    ("queue", {"colour": "red"}, InvalidArguments, "colour: Extra inputs are not permitted"),
    ("job", {}, InvalidArguments, "job_id: Field required; it takes job_id"),
    ("job", {"job_id": [1]}, InvalidArguments, "job_id: Input should be a valid integer"),
    ("logs", {"job_id": 1, "offset": -5}, InvalidArguments, "offset is a byte position"),
    ("cancel", {"ids": "all"}, InvalidArguments, "ids: Input should be a valid list"),
    ("cancel", {"ids": ["x"]}, InvalidArguments, "ids.0: Input should be a valid integer"),
    ("submit", {"spec": "echo hi"}, InvalidArguments, "spec: Input should be a valid dict"),
    ("submit", {"spec": {"command": "true", "gpus": "lots"}}, InvalidJobSpec, "gpus"),
    ("submit", {"spec": {"command": "true", "colour": "red"}}, InvalidJobSpec,
     "colour: Extra inputs are not permitted"),
    ("submit", {"spec": {"command": "a\x00b"}}, InvalidJobSpec, "NUL"),
    ("submit", {"spec": {"command": "true", "env": {"A=B": "c"}}}, InvalidJobSpec,
     "bad variable 'A=B'"),
    ("launch", {"spec": {"command": "true"}}, InvalidArguments, "num_jobs: Field required"),
    ("launch", {"spec": {"command": "true"}, "num_jobs": 10**9}, InvalidJobSpec,
     "--num-jobs must be between 1 and 100,000"),
    ("submit_many", {"origin": "f", "specs": [{"command": "ok"}, {"gpus": 1}]},
     InvalidJobSpec, "command: Field required"),
])
def test_bad_operation_json_is_refused_before_anything_changes(accepted, rt, name, kwargs,
                                                               error, message):
    with pytest.raises(error) as e:
        call_local(rt, name, kwargs)
    assert message in str(e.value)
    assert snapshot(rt) == accepted


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=8)
READ_ONLY = ["queue", "job", "launches", "logs", "status"]


@hsettings(max_examples=150, deadline=None, suppress_health_check=FIXTURES)
@given(name=st.sampled_from([*READ_ONLY, "nope"]) | st.text(max_size=8),
       kwargs=st.dictionaries(st.sampled_from(["job_id", "limit", "offset", "ids", "status",
                                               "launch_id", "sort", "x"]),
                              json_values, max_size=3) | json_values)
def test_garbage_operation_json_gets_an_answer_or_a_gpuq_error(accepted, rt, name, kwargs):
    try:
        answer = call_local(rt, name, kwargs)
    except GpuqError:
        pass
    else:
        assert name in OPERATIONS and isinstance(answer, dict)
    assert snapshot(rt) == accepted


@pytest.mark.e2e
@pytest.mark.parametrize(("args", "code"), [
    (["reboot", {}], "unknown_operation"),
    (["queue", [1, 2]], "invalid_arguments"),
    (["queue", {"limit": "many"}], "invalid_arguments"),
    (["job"], "invalid_arguments"),
    ([], "unknown_operation"),
])
def test_the_control_worker_answers_bad_json_with_an_error_envelope(remote_client, args, code):
    result = remote_client.rt.celery.send_task("gpuq.op", args=args, queue="control")
    envelope = result.get(timeout=30)
    result.forget()
    assert envelope["ok"] is False and envelope["code"] == code
    assert envelope["message"]


# -- stored payloads ------------------------------------------------------------------------

@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_unpickle(data):
    with pytest.raises(PayloadError):
        payloads.unpack(data)


def _framed(body: bytes, flags: int) -> bytes:
    header = struct.pack(">4sB32s", payloads.MAGIC, flags, hashlib.sha256(body).digest())
    return header + body


@given(st.binary(max_size=300), st.sampled_from([0, payloads.GZIPPED]))
def test_intact_frames_around_garbage_are_refused_as_payload_errors(body, flags):
    with pytest.raises(PayloadError):
        payloads.unpack(_framed(body, flags))


@given(st.data())
def test_every_truncation_and_bit_flip_of_a_payload_is_refused(data):
    secret = data.draw(st.none() | st.just("s"))
    value = {"command": "train", "pad": data.draw(st.text(max_size=5000))}
    framed = payloads.pack(value, 2**20, secret)
    cut = data.draw(st.integers(0, len(framed) - 1))
    with pytest.raises(PayloadError):
        payloads.unpack(framed[:cut], secret)
    at = data.draw(st.integers(0, len(framed) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = framed[:at] + bytes([framed[at] ^ (1 << bit)]) + framed[at + 1:]
    with pytest.raises(PayloadError):
        payloads.unpack(flipped, secret)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda b: b[:20], "truncated"),
    (lambda b: b[:-2], "corrupted"),
    (lambda b: b"GPQ9" + b[4:], "not a gpuq payload of this version"),
    (lambda b: b[:4] + b"\x80" + b[5:], "not a gpuq payload of this version (flags 0x80)"),
    (lambda b: b + b"\x00" * 2000, "over the limit of 1,500; raise GPUQ_MAX_PAYLOAD_BYTES"),
])
def test_a_damaged_payload_in_redis_is_refused_and_left_as_it_was(rt, damage, message):
    key = payloads.store(rt.redis, {"command": "x" * 100}, 600, 1500)
    rt.redis.set(key, damage(rt.redis.get(key)))
    before = snapshot(rt)
    with pytest.raises(PayloadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        payloads.load(rt.redis, key, limit_bytes=1500)
    assert snapshot(rt) == before


def test_a_payload_over_the_limit_is_refused_before_anything_is_queued(accepted, settings,
                                                                       rt):
    import os

    from app.client import Client
    from app.core.errors import PayloadTooLarge

    small = Client(settings.model_copy(update={"max_payload_bytes": 10_000}), "local")
    try:
        with pytest.raises(PayloadTooLarge, match="GPUQ_MAX_PAYLOAD_BYTES"):
            small.launch(print, 2, os.urandom(20_000))
        with pytest.raises(PayloadTooLarge, match="GPUQ_MAX_PAYLOAD_BYTES"):
            small.submit("true", secrets={"BLOB": os.urandom(20_000).hex()})
    finally:
        small.close()
    assert snapshot(rt) == accepted
