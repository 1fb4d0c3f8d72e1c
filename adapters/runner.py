"""The universal runner: `python -m adapters.runner [--payload-file F] [--result-file R]`.

It reads a payload, runs the function call or shell command it holds, and writes its
result (a JSON status and the pickled value or exception). It needs only the standard
library and cloudpickle (and a backend's SDK where its payload lives there), so it runs
wherever the job runs: on a GPU worker, in a Slurm allocation, in a Batch or Kubernetes
container. SIGTERM ends it with the conventional exit code 143 (after stopping a command's
process group).

Where the payload comes from: `--payload-file`, else GPUQ_PAYLOAD (base64, for small
payloads passed inline), else GPUQ_PAYLOAD_FILE (a path on a shared filesystem), else
GPUQ_PAYLOAD_URI (s3://bucket/key, read with boto3).
Where the result goes: `--result-file`, else GPUQ_RESULT_URI/<rank>.pkl (s3://), else
GPUQ_RESULT_DIR/<rank>.pkl.
The rank: GPUQ_JOB_RANK, else the backend's array index (SLURM_ARRAY_TASK_ID,
AWS_BATCH_JOB_ARRAY_INDEX, JOB_COMPLETION_INDEX) plus GPUQ_RANK_OFFSET (an array split in
parts), exported as GPUQ_JOB_RANK for the job.

Payload (cloudpickled dict): {"call": <cloudpickled {"fn", "args", "kwargs"}>, "item":
<cloudpickled first argument, for map>} or "items" (one per rank); or {"command": "...",
"rank_args": [[...], ...] or None} for a shell command. Either may hold "secrets": {name:
value}, variables exported to the job and kept out of its recorded environment.

Result (the format app/core/results.py reads): a line `GPQR1`, a JSON status line
{"ok": true} or {"ok": false, "type": "...", "message": "...", "traceback": "..."} (at most
64 KiB: long texts are cut), then the pickled value, or the pickled exception (nothing when
it does not pickle). gpuq's processes read the status line only; the pickled part is
unpickled by the client that asked for the result, never by gpuq.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import cloudpickle

EXIT_ERROR = 1
EXIT_TERMINATED = 143
# What a command's runner passes on to the command's process group: every signal a job may
# ask for before its time limit (`--signal`, app/core/durations.py SIGNALS, which a
# backend such as Slurm sends to the runner), SIGTERM among them.
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
             signal.SIGQUIT, signal.SIGALRM, signal.SIGXCPU, signal.SIGURG, signal.SIGWINCH)


RESULT_MAGIC = b"GPQR1\n"
MAX_STATUS_BYTES = 64 * 1024
# Characters kept of a message and of a traceback: at 4 UTF-8 bytes a character at most,
# the status line stays well under MAX_STATUS_BYTES.
_TEXT_CHARS = 4 * 1024


def _cut(text: str, keep: int) -> str:
    if len(text) <= 2 * keep:
        return text
    return f"{text[:keep]}\n[... {len(text) - 2 * keep:,} characters cut ...]\n{text[-keep:]}"


def _error_result(exc: BaseException) -> tuple[dict[str, Any], bytes]:
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    status = {"ok": False, "type": _cut(kind, 128), "message": _cut(str(exc), _TEXT_CHARS // 2),
              "traceback": _cut("".join(traceback.format_exception(exc)), _TEXT_CHARS)}
    # An exception that does not pickle still reports its type, text and traceback.
    pickled = b""
    with contextlib.suppress(Exception):
        pickled = cloudpickle.dumps(exc)
    return status, pickled


def _result_bytes(status: dict[str, Any], pickled: bytes) -> bytes:
    # A lone surrogate becomes its JSON escape; no raw newline survives json.dumps.
    line = json.dumps(status, ensure_ascii=False).encode("utf-8", "backslashreplace")
    assert len(line) <= MAX_STATUS_BYTES and b"\n" not in line
    return RESULT_MAGIC + line + b"\n" + pickled


def _write(path: Path | str, status: dict[str, Any], pickled: bytes) -> None:
    data = _result_bytes(status, pickled)
    if isinstance(path, str):  # s3://bucket/key
        bucket, key = _s3_location(path)
        _s3().put_object(Bucket=bucket, Key=key, Body=data)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # the reader never sees half an envelope


# The runner's own variables, not the job's.
RUNNER_ONLY = ("GPUQ_PAYLOAD", "GPUQ_PAYLOAD_FILE", "GPUQ_PAYLOAD_URI", "GPUQ_PAYLOAD_CONFIGMAP",
               "GPUQ_RESULT_DIR", "GPUQ_RESULT_URI", "GPUQ_RANK_OFFSET")
ARRAY_INDEX_VARIABLES = ("SLURM_ARRAY_TASK_ID", "AWS_BATCH_JOB_ARRAY_INDEX",
                         "JOB_COMPLETION_INDEX")


def rank_from_environment(env: dict[str, str]) -> int:
    """This replica's rank: gpuq's own variable, or the backend's array index."""
    if env.get("GPUQ_JOB_RANK"):
        return int(env["GPUQ_JOB_RANK"])
    for name in ARRAY_INDEX_VARIABLES:
        if env.get(name):
            return int(env[name]) + int(env.get("GPUQ_RANK_OFFSET", "0"))
    return 0


def read_payload(payload_file: Path | None, env: dict[str, str]) -> dict[str, Any]:
    if payload_file is not None:
        data = payload_file.read_bytes()
    elif env.get("GPUQ_PAYLOAD"):
        data = base64.b64decode(env["GPUQ_PAYLOAD"])
    elif env.get("GPUQ_PAYLOAD_FILE"):
        data = Path(env["GPUQ_PAYLOAD_FILE"]).read_bytes()
    elif env.get("GPUQ_PAYLOAD_URI"):
        bucket, key = _s3_location(env["GPUQ_PAYLOAD_URI"])
        data = _s3().get_object(Bucket=bucket, Key=key)["Body"].read()
    else:
        raise SystemExit("no payload: pass --payload-file, GPUQ_PAYLOAD, GPUQ_PAYLOAD_FILE or "
                         "GPUQ_PAYLOAD_URI")
    spec: dict[str, Any] = cloudpickle.loads(data)
    return spec


def _s3() -> Any:
    """An S3 client (boto3, present in a Batch image); AWS_ENDPOINT_URL is honoured."""
    import boto3

    return boto3.client("s3")


def _s3_location(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise SystemExit(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def run_command(spec: dict[str, Any], rank: int, num_jobs: str) -> int:
    """Run a command payload for this rank in its own process group; return its code."""
    command = spec["command"].replace("{rank}", str(rank)).replace("{num_jobs}", num_jobs)
    rank_args = spec.get("rank_args")
    if rank_args is not None:
        command = f"{command} {shlex.join(str(a) for a in rank_args[rank])}"
    started: list[subprocess.Popen[bytes]] = []
    early: list[int] = []  # what came before the command's group was there

    def forward(signum: int, _frame: object) -> None:
        if not started:
            early.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(started[0].pid, signum)

    for forwarded in FORWARDED:
        signal.signal(forwarded, forward)
    proc = subprocess.Popen(["bash", "-c", command], start_new_session=True)
    started.append(proc)
    for signum in early:
        forward(signum, None)
    code = proc.wait()
    return EXIT_TERMINATED if code == -signal.SIGTERM else (128 - code if code < 0 else code)


def call(spec: dict[str, Any]) -> Any:
    """Run the call a payload describes for this replica's rank."""
    call_spec = cloudpickle.loads(spec["call"])
    args = tuple(call_spec.get("args", ()))
    item = spec.get("item")
    if item is None and spec.get("items") is not None:
        item = spec["items"][int(os.environ.get("GPUQ_JOB_RANK", "0"))]
    if item is not None:
        args = (cloudpickle.loads(item), *args)
    return call_spec["fn"](*args, **call_spec.get("kwargs", {}))


def take_secrets_file(env: dict[str, str]) -> None:
    """Secrets a backend left in a private file named by GPUQ_SECRETS_FILE (NAME=VALUE
    records separated by NUL, as no variable holds one): read, deleted before the job runs,
    and put in the job's environment (never in the one the backend stores)."""
    path = env.pop("GPUQ_SECRETS_FILE", None)
    os.environ.pop("GPUQ_SECRETS_FILE", None)
    if not path:
        return
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SystemExit(f"the secrets file {path} is gone: a runner of this job already "
                         "took it (the job was started twice?); submit the job again") from None
    Path(path).unlink()
    for record in filter(None, data.split(b"\0")):
        name, _, value = record.decode(errors="surrogateescape").partition("=")
        os.environ[name] = value


class Terminated(Exception):
    """The job was told to stop (SIGTERM)."""


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise Terminated("terminated by SIGTERM")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters.runner")
    parser.add_argument("--payload-file", type=Path)
    parser.add_argument("--result-file", type=Path)
    options = parser.parse_args(argv)
    env = dict(os.environ)
    rank = rank_from_environment(env)
    os.environ["GPUQ_JOB_RANK"] = str(rank)
    spec = read_payload(options.payload_file, env)
    for name in RUNNER_ONLY:  # where the payload and result are: the job has no use for them
        os.environ.pop(name, None)
    # Secret variables travel in the payload, never in the job's recorded environment.
    os.environ.update(spec.get("secrets") or {})
    take_secrets_file(env)
    if "command" in spec:
        return run_command(spec, rank, env.get("GPUQ_NUM_JOBS", "1"))
    result: Path | str
    if options.result_file is not None:
        result = options.result_file
    elif env.get("GPUQ_RESULT_URI"):
        result = f"{env['GPUQ_RESULT_URI'].rstrip('/')}/{rank}.pkl"
    elif env.get("GPUQ_RESULT_DIR"):
        result = Path(env["GPUQ_RESULT_DIR"]) / f"{rank}.pkl"
        result.parent.mkdir(parents=True, exist_ok=True)
    else:
        raise SystemExit("no result destination: pass --result-file, GPUQ_RESULT_DIR or "
                         "GPUQ_RESULT_URI")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        value = call(spec)
    except Terminated as e:
        _write(result, *_error_result(e))
        return EXIT_TERMINATED
    except BaseException as e:
        traceback.print_exc()
        _write(result, *_error_result(e))
        return EXIT_ERROR
    try:
        pickled = cloudpickle.dumps(value)
    except Exception as e:  # the value does not pickle: say so rather than lose it silently
        _write(result, *_error_result(e))
        return EXIT_ERROR
    _write(result, {"ok": True}, pickled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
