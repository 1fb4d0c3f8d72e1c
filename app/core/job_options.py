"""The options that set a job's fields (app/store/spec.py JobSpec), declared once: the
CLI's submit and launch, the watched jobs file and the dashboard's request models all read
JOB_OPTIONS. The standard library only, so that `gpuq submit` builds its options without
loading pydantic: JobSpec validates what they give where the job is stored."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from app.core.backends import ADAPTERS
from app.core.durations import FORMS, parse_duration, parse_signal, signal_text

# The longest command a job may have, in UTF-8 bytes. A command that needs a shell reaches
# it as one argument of `bash -c`, and Linux caps one argument at 128 KiB (MAX_ARG_STRLEN);
# the margin leaves room for a conda activation around it. A longer one belongs in a
# script file the command runs.
MAX_COMMAND_BYTES = 120 * 1024


OptionKind = Literal["int", "text", "path", "ints", "env", "flag", "duration", "signal"]


@dataclass(frozen=True)
class JobOption:
    """One option of `gpuq submit` / `gpuq launch` and of a jobs-file line."""

    field: str  # the JobSpec field it sets
    flag: str  # `--flag` on the command line; `flag=` (with _ for -) in the jobs file
    kind: OptionKind
    help: str
    repeatable: bool = False  # given once per value on the command line (--env, --after)
    # What the command line shows and gives when the option is not: JobSpec's default
    # (tests/unit hold them equal); None where that is None or an empty collection.
    default: Any = None

    @property
    def file_key(self) -> str:
        return self.flag.replace("-", "_")

    def parse(self, text: str, cwd: Path | None = None) -> Any:
        """The field's value from one piece of text; ValueError names what it takes.
        A `path` is made absolute against `cwd` when one is given (the CLI's directory)."""
        if self.kind == "path" and cwd is not None:
            return str((cwd / text).resolve())
        parser = _PARSERS.get(self.kind)
        return text if parser is None else parser(text, self.flag)


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{flag} takes an integer, got {text!r}") from None


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, e.g. 0,3; "
                         f"got {text!r}") from None


def _env(text: str, flag: str) -> dict[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"{flag} takes KEY=VALUE, got {text!r}")
    return {key: value}


def _flag(text: str, flag: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"{flag} takes true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def _signal(text: str, flag: str) -> str:
    return signal_text(*parse_signal(text, flag))


# How each kind of option reads its text (a `text` or `path` is taken as it is); a time
# limit (`--time 2h`) is seconds, its warning signal (`--signal usr2@90`) USR2@90.
_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "int": _int, "ints": _ints, "env": _env, "flag": _flag, "duration": parse_duration,
    "signal": _signal,
}


JOB_OPTIONS: tuple[JobOption, ...] = (
    JobOption("gpus", "gpus", "int", "GPUs the job needs (0 for none).", default=1),
    JobOption("name", "name", "text", "A name to find the job by."),
    JobOption("priority", "priority", "int", "Higher starts first.", default=0),
    JobOption("env", "env", "env", "KEY=VALUE for the job's environment (repeatable).",
              repeatable=True),
    JobOption("workdir", "workdir", "path", "Directory the command runs in."),
    JobOption("venv", "venv", "text", "A virtualenv to activate."),
    JobOption("conda_env", "conda-env", "text", "A conda env to activate."),
    JobOption("max_restarts", "max-restarts", "int",
              "Restarts after a failed attempt, on every backend.", default=0),
    JobOption("time_limit_s", "time", "duration",
              f"Time limit of each attempt from its start ({FORMS}); at the limit the job is "
              "stopped and ends TIMEOUT, never restarted. Unset: your default_time, if any."),
    JobOption("signal", "signal", "signal",
              "SIG@SECONDS: send SIG to the job's process group that many seconds before its "
              "time limit, once, e.g. USR2@90 to checkpoint."),
    JobOption("recover_exit_codes", "recover-on-exit-codes", "ints",
              "Exit codes that restart without spending the budget, e.g. 137."),
    JobOption("allowed_gpu_ids", "gpu-ids", "ints", "Only these GPU indices, e.g. 0,3."),
    JobOption("preflight", "preflight", "text",
              "A check to run on the job's GPUs first, e.g. nccl."),
    JobOption("tmux", "tmux", "flag", "Run in a tmux session (`gpuq attach ID`).", default=False),
    JobOption("backend", "backend", "text",
              "local (this cluster's GPU workers) or a batch backend: "
              f"{', '.join(ADAPTERS)}.", default="local"),
    JobOption("project", "project", "text", "The project its GPU time counts to (limits, "
              "fair share, `gpuq report`); your default project when unset."),
    JobOption("after", "after", "ints", "Start only once these jobs have SUCCEEDED, e.g. "
              "12,13 (repeatable); cancelled if one of them does not.", repeatable=True),
)
