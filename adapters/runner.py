"""The universal runner: `python -m adapters.runner --payload-file F --result-file R`.

It unpickles a function call, runs it, and writes a success-or-error envelope. It needs
only the standard library and cloudpickle, so it runs wherever the job runs. SIGTERM ends
it with the conventional exit code 143 after writing an error envelope.

Payload file (cloudpickled dict): {"call": <cloudpickled {"fn", "args", "kwargs"}>,
"item": <cloudpickled first argument, for map>} or "items" (one per rank, picked by
GPUQ_JOB_RANK).

Envelope (cloudpickled dict): {"ok": True, "value": <cloudpickled value>} or {"ok": False,
"type": "...", "message": "...", "traceback": "...", "exception": <cloudpickled exception,
when it pickles>}. Values and exceptions are pickled inside the envelope so that a reader
can learn whether a job succeeded without importing the user's modules.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import cloudpickle

EXIT_ERROR = 1
EXIT_TERMINATED = 143


def _error_envelope(exc: BaseException) -> dict[str, Any]:
    envelope: dict[str, Any] = {
        "ok": False, "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc), "traceback": "".join(traceback.format_exception(exc)),
    }
    # An exception that does not pickle still reports its type, text and traceback.
    with contextlib.suppress(Exception):
        envelope["exception"] = cloudpickle.dumps(exc)
    return envelope


def _write(path: Path, envelope: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(cloudpickle.dumps(envelope))
    tmp.replace(path)  # the reader never sees half an envelope


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


def read_envelope_status(data: bytes) -> dict[str, Any]:
    """An envelope's outer fields; its value and exception stay pickled."""
    envelope: dict[str, Any] = cloudpickle.loads(data)
    return envelope


class Terminated(Exception):
    """The job was told to stop (SIGTERM)."""


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise Terminated("terminated by SIGTERM")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters.runner")
    parser.add_argument("--payload-file", type=Path, required=True)
    parser.add_argument("--result-file", type=Path, required=True)
    options = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        spec = cloudpickle.loads(options.payload_file.read_bytes())
        value = call(spec)
    except Terminated as e:
        _write(options.result_file, _error_envelope(e))
        return EXIT_TERMINATED
    except BaseException as e:
        traceback.print_exc()
        _write(options.result_file, _error_envelope(e))
        return EXIT_ERROR
    try:
        _write(options.result_file, {"ok": True, "value": cloudpickle.dumps(value)})
    except Exception as e:  # the value does not pickle: say so rather than lose it silently
        _write(options.result_file, _error_envelope(e))
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
