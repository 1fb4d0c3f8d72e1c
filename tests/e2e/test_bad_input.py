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


# What a submit, launch or cancel writes to Redis: stored payloads, cancel flags, results,
# GPU holds, batch cancel marks, and the queues that route jobs to GPUs and CPU slots.
# Everything else there is a clock's traffic while any worker or beat runs (heartbeats,
# GPU readings, dispatch passes, batch syncs on the `control` queue): none of it holds
# anything a user submitted, and a refused input's snapshot must not count it.
INPUT_KEY_PREFIXES = tuple(f"{keys.PREFIX}:{kind}:" for kind in (
    "payload", "cancel", "result", "hold"))
GPU_QUEUES = keys.gpu_queue("", 0).split(".")[0] + "."


def written_by_input(key: str) -> bool:
    if key.startswith(f"{keys.PREFIX}:batch:"):
        return ":cancelled:" in key  # not the syncs' pace (keys.batch_poll)
    # Kombu names a queue's priority lists after it: `cpu`, `cpu\x06\x163`, `gpu.h.0`...
    return (key.startswith((*INPUT_KEY_PREFIXES, GPU_QUEUES))
            or key.split("\x06")[0] == keys.CPU_QUEUE)


def snapshot(rt) -> tuple[Any, ...]:
    """Everything accepted so far: rows of every table, and every Redis key that a refused
    input could have written, with its value."""
    with rt.session() as session:
        rows = tuple(tuple(sorted(o.model_dump().items(), key=str))
                     for table in (Job, JobEvent, Launch, JobDependency)
                     for o in session.exec(select(table)))
    r = rt.redis
    return rows, {k: r.dump(k) for k in sorted(r.keys("*"))
                  if written_by_input(k.decode(errors="replace"))}


def test_the_snapshot_ignores_the_clocks_traffic_but_not_a_queued_job(rt):
    before = snapshot(rt)
    rt.redis.rpush(keys.CONTROL_QUEUE, b"gpuq.batch.process sync message from beat")
    rt.redis.set(keys.alive("somehost", 0), 1)
    rt.redis.hset(keys.batch_poll("slurm"), "due", 1)
    assert snapshot(rt) == before
    for written in (keys.gpu_queue("somehost", 1), keys.CPU_QUEUE, "cpu\x06\x163"):
        rt.redis.rpush(written, b"a job's start message")
        assert snapshot(rt) != before, written
        rt.redis.delete(written)
    rt.redis.set(keys.new_payload(), b"payload")
    assert snapshot(rt) != before


@pytest.fixture
def accepted(local, rt):
    """One job and one launch already accepted; the snapshot to compare with."""
    local.submit("echo accepted", gpus=1, name="accepted")
    local.launch("echo replica {rank}", 2, gpus=1)
    return snapshot(rt)


# -- the jobs file ------------------------------------------------------------------------

# Values with no space, quote or backslash: each word stays one word when the line is split,
# so none can hide the garbage word among them inside quotes or past a ` -- `.
word_values = st.text(st.characters(blacklist_categories=("Z", "C"),
                                    blacklist_characters="'\"\\"), max_size=12)
option_words = st.builds(lambda k, v: f"{k}={v}",
                         st.sampled_from([*KNOWN, "env.X", "gpus", "colour", ""]), word_values)
garbage_words = st.sampled_from(["colour=red", "gpus=two", "bare", "=1", "env.=x"])


@given(st.text(max_size=200))
def test_any_line_parses_to_a_valid_spec_or_a_numbered_error(line):
    try:
        spec = parse_line(line, 7)
    except JobsFileError as e:
        assert str(e).startswith("line 7: ")
        return
    assert spec is None or spec["command"].strip()


@given(st.lists(option_words, max_size=6), garbage_words, st.integers(0, 6),
       st.text(max_size=30))
def test_option_garbage_before_the_separator_is_refused_by_line(words, garbage, at, command):
    words.insert(at, garbage)
    with pytest.raises(JobsFileError) as refused:
        parse_line(" ".join(words) + " -- " + command, 3)
    assert refused.value.lineno == 3 and str(refused.value).startswith("line 3: ")


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
    watcher = JobsFileWatcher(path, lambda origin, specs, **more: local.call(
        "submit_many", origin=origin, specs=specs, **more))
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
    (["submit", "--secret", "=x", "--", "true"], "--secret takes a NAME, not NAME=VALUE"),
    (["submit", "--secret", "TOKEN=x", "--", "true"], "pass --secret TOKEN, or list it in a "
     "--secret-file PATH"),
    (["submit", "--secret", "GPUQ_TEST_UNSET_VARIABLE", "--", "true"], "no such variable"),
    (["launch", "-n", "0", "--", "true"], "--num-jobs must be between 1 and 100,000"),
    (["launch", "-n", "100001", "--", "true"], "split a larger sweep"),
    (["queue", "--status", "SLEEPY"], "unknown status 'SLEEPY'; choose one of"),
    (["queue", "--limit", "0"], "--limit must be between 1 and"),
    (["cancel"], "say what to cancel"),
    (["cancel", "987654"], "no job with id 987654"),
    (["logs", "987654"], "no job with id 987654"),
    (["wait", "987654"], "no job with id 987654"),
    (["wait", "987654", "--timeout", "1"], "no job with id 987654"),
    (["wait", "--launch", "424242"], "no launch with id 424242"),
    (["wait"], "name job ids or --launch L"),
    # Ids beyond the database's integer columns name nothing, they do not overflow it.
    (["logs", str(2**64)], f"no job with id {2**64}"),
    (["cancel", str(2**64)], f"no job with id {2**64}"),
    (["wait", str(2**64)], f"no job with id {2**64}"),
    (["cancel", "--launch", str(2**64)], f"no launch with id {2**64}"),
    (["wait", "--launch", str(2**64)], f"no launch with id {2**64}"),
    # A shell hands bytes that are not UTF-8 (`--name $'\\xff'`) to Python as surrogates.
    (["submit", "--name", "\udcff", "--", "true"], "name: Value error, holds bytes that are "
     "not UTF-8"),
    (["submit", "--workdir", "/tmp/\udcff", "--", "true"], "workdir: Value error, holds bytes"),
    (["submit", "--venv", "/opt/\udcff", "--", "true"], "venv: Value error, holds bytes"),
    (["submit", "--env", "A=\udcff", "--", "true"], "env: Value error, holds bytes"),
    (["submit", "--", "echo", "\udcff"], "command: Value error, holds bytes"),
    (["launch", "-n", "2", "--name", "\udcff", "--", "true"], "holds bytes that are not"),
    (["submit", "--", ""], "the command is empty"),
    (["submit", "--", " "], "the command is empty"),
    (["submit", "--", "", "x"], "the command is empty"),
    (["launch", "-n", "2", "--", ""], "the command is empty"),
    (["submit", "--", "echo", "x" * (130 * 1024)],
     "over the limit of 122,880; put a long command in a script file"),
    # Other users' text is bounded and printable (app/core/text.py).
    (["submit", "--name", "n" * 257, "--", "true"], "over the limit of 256; give a shorter"),
    (["submit", "--name", "two\nlines", "--", "true"], "the name holds a control character"),
    (["submit", "--name", "\x1b]0;owned\x07", "--", "true"], "holds a control character"),
    (["submit", "--name", "abc\u202edcba", "--", "true"], "holds a control character"),
    (["submit", "--workdir", "/" + "d" * 5000, "--", "true"], "over the limit of 4,096"),
    (["submit", "--name", "zero\u200bwidth", "--", "true"], "holds a control character"),
    (["submit", "--env", "BIG=" + "v" * (70 * 1024), "--", "true"],
     "over the limit of 1,024 variables or 65,536 bytes"),
    (["watch", "."], "is a directory; name the jobs file in it"),
    (["dashboard", "--port", "-1"], "--port takes a TCP port number from 1 to 65535, got -1"),
    (["dashboard", "--port", "70000"], "--port takes a TCP port number"),
])
def test_bad_cli_input_is_a_gpuq_error_naming_the_fix_and_changes_nothing(
        accepted, rt, settings, args, message):
    result = CliRunner().invoke(cli, args, env=settings.as_environment())
    assert isinstance(result.exception, GpuqError), (result.output, result.exception)
    assert message in str(result.exception)
    assert "\n" not in str(result.exception)
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
    ("reboot", {}, UnknownOperation, "unknown operation 'reboot'; known: add_project, cancel"),
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


# Submit, launch and cancel with fuzzed arguments: bad input is refused with one line and
# changes nothing; input that is accepted adds its own jobs, or cancels the ones it names,
# and leaves every other job and launch as it was.
# Text a shell or a script hands over: bytes that are not UTF-8 (as surrogates), a NUL,
# quotes alone, a newline, a template; then any text.
odd_text = st.sampled_from(["\udcff", "caf\udce9", "a\x00b", "''", "x\ny", "{rank}", ""]) | \
    st.text(st.sampled_from("a-_/ '\"{}#\n\x00\udcff"), max_size=6) | st.text(max_size=8)
# Ids: of the accepted jobs and launch, unknown, and beyond every database's id column.
any_id = st.sampled_from([1, 2, 3, 0, -1, 99, 2**31, 2**63, 2**64 + 1, -2**70]) | st.integers()
# Well-formed specs with odd text in one field, then with several fields drawn, then
# anything at all: hypothesis favours the first choices.
TEXT_FIELDS = ["name", "workdir", "venv", "conda_env", "command", "preflight"]
one_odd_field = st.builds(lambda field, text: {"command": "true", field: text},
                          st.sampled_from(TEXT_FIELDS), odd_text)
fuzzed_spec = one_odd_field | st.fixed_dictionaries({
    "command": st.sampled_from(["true", "echo {rank}", "", " ", "''"]) | odd_text,
}, optional={
    "gpus": st.integers(-1, 3), "name": odd_text, "priority": st.integers(-5, 5),
    "env": st.dictionaries(st.sampled_from(["A", "B_1", "", "C=D"]), odd_text, max_size=2),
    "workdir": odd_text, "venv": odd_text, "max_restarts": st.integers(-1, 3),
    "allowed_gpu_ids": st.lists(any_id, max_size=2),
    "backend": st.sampled_from(["local", "process", "mainframe"]),
    "after": st.lists(any_id, max_size=2), "kind": st.sampled_from(["command", "x"]),
}) | st.dictionaries(st.sampled_from(["command", "gpus", "env", "after", "colour"]),
                     json_values, max_size=3) | json_values
# Replica counts stay small when valid: the machine that runs this is slow.
replica_counts = (st.integers(1, 3) | st.integers(-2**70, 0) | st.integers(100_001, 2**70)
                  | st.none()
                  | st.text(max_size=4) | st.lists(st.integers(), max_size=2))
MUTATIONS = {
    "submit": st.fixed_dictionaries({"spec": fuzzed_spec},
                                    optional={"allow_duplicate": json_values}),
    "launch": st.fixed_dictionaries({"spec": fuzzed_spec, "num_jobs": replica_counts}),
    "cancel": st.fixed_dictionaries({}, optional={
        "ids": st.lists(any_id, max_size=3) | json_values, "name": odd_text | json_values,
        "launch_id": any_id | json_values, "all_jobs": json_values}),
}


def rows_by_id(rt, table) -> dict[int, dict[str, Any]]:
    with rt.session() as session:
        return {row.id: row.model_dump() for row in session.exec(select(table))}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_fuzzed_submit_launch_and_cancel_refuse_bad_input_and_keep_what_was_accepted(
        accepted, rt, name):
    @hsettings(max_examples=50, deadline=None, suppress_health_check=FIXTURES, database=None,
               derandomize=True)
    @given(kwargs=MUTATIONS[name])
    def check(kwargs):
        before = snapshot(rt)
        jobs, launches = rows_by_id(rt, Job), rows_by_id(rt, Launch)
        try:
            answer = call_local(rt, name, kwargs)
        except GpuqError as e:
            assert "\n" not in str(e), str(e)
            assert snapshot(rt) == before
            return
        named = set(answer.get("cancelled", [])) | set(answer.get("cancelling", []))
        after = rows_by_id(rt, Job)
        assert {i: after[i] for i in jobs if i not in named} == {
            i: row for i, row in jobs.items() if i not in named}
        assert {after[i]["state"] for i in named} <= {"CANCELLED", "CANCELLING"}
        assert {i: row for i, row in rows_by_id(rt, Launch).items() if i in launches} == \
            launches

    check()


# -- stored payloads ------------------------------------------------------------------------

KEY = "gpuq:payload:launch:0123456789abcdef"


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_unpickle(data):
    with pytest.raises(PayloadError):
        payloads.unpack(data, key=KEY)


def _framed(body: bytes, flags: int) -> bytes:
    """A frame with a valid digest for KEY around any bytes."""
    length = len(body)
    signed = (payloads.MAGIC + bytes([flags]) + length.to_bytes(8, "big")
              + payloads.PAYLOAD.encode() + b"\0" + KEY.encode() + b"\0" + body)
    header = struct.pack(">4sBQ32s", payloads.MAGIC, flags, length,
                         hashlib.sha256(signed).digest())
    return header + body


@given(st.binary(max_size=300), st.sampled_from([0, payloads.GZIPPED]))
def test_intact_frames_around_garbage_are_refused_as_payload_errors(body, flags):
    with pytest.raises(PayloadError):
        payloads.unpack(_framed(body, flags), key=KEY)


@given(st.data())
def test_every_truncation_and_bit_flip_of_a_payload_is_refused(data):
    secret = data.draw(st.none() | st.just("s"))
    value = {"command": "train", "pad": data.draw(st.text(max_size=5000))}
    framed = payloads.pack(value, 2**20, secret, key=KEY)
    cut = data.draw(st.integers(0, len(framed) - 1))
    with pytest.raises(PayloadError):
        payloads.unpack(framed[:cut], secret, key=KEY)
    at = data.draw(st.integers(0, len(framed) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = framed[:at] + bytes([framed[at] ^ (1 << bit)]) + framed[at + 1:]
    with pytest.raises(PayloadError):
        payloads.unpack(flipped, secret, key=KEY)


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


# -- through a real control worker (last: its stack, with beat's clock, stays up until the
# module ends, and nothing else here should run beside it) -----------------------------

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
