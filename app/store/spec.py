"""What a user may ask of a job, declared once: `JobSpec`, validated before anything is
stored. The options that set its fields are app/core/job_options.py's JOB_OPTIONS.

A new job option is a field of JobSpec, a line of JOB_OPTIONS, a column of the job table
(with its migration), and the code that acts on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.core.backends import BACKENDS
from app.core.durations import MAX_TIME_S, parse_duration, parse_signal, signal_text
from app.core.errors import InvalidJobSpec
from app.core.job_options import JOB_OPTIONS, MAX_COMMAND_BYTES, JobOption
from app.core.text import (
    MAX_ENV_BYTES,
    MAX_ENV_VARS,
    MAX_NAME_CHARS,
    MAX_PATH_CHARS,
    has_control,
    plain_name_problem,
)

# Ids fit every database's integer column (PostgreSQL's INTEGER is 32-bit): a larger id
# names nothing there is, and is answered as such instead of overflowing the driver.
MAX_ID = 2**31 - 1



def check_dependencies_allowed(backend: str, after: Sequence[int]) -> None:
    """Batch jobs are handed to their backend at once: nothing would hold one back there."""
    if after and backend != "local":
        raise ValueError(f"the {backend} backend takes no dependencies (--after); submit the "
                         "job when the ones it needs have ended, or run it on the local backend")


class JobSpec(BaseModel):
    """What a user asks for; validated before anything is stored."""

    model_config = ConfigDict(extra="forbid")

    command: str = Field(min_length=1)
    gpus: int = Field(1, ge=0, le=64)
    name: str | None = None
    priority: int = Field(0, ge=-1000, le=1000)
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = None
    venv: str | None = None
    conda_env: str | None = None
    max_restarts: int = Field(0, ge=0, le=1000)
    # Seconds each attempt may run (a duration such as "2h" is read too); None: no limit,
    # unless the owner's or project's default_time gives one at submission.
    time_limit_s: int | None = Field(None, ge=1, le=MAX_TIME_S)
    # SIG@SECONDS: sent to the job's process group that long before its time limit.
    signal: str | None = None
    recover_exit_codes: list[int] = Field(default_factory=list)
    allowed_gpu_ids: list[Annotated[int, Field(ge=0, le=1023)]] | None = Field(
        None, min_length=1)
    backend: str = "local"
    preflight: str | None = None
    tmux: bool = False
    kind: str = "command"
    payload_key: str | None = None
    # Whose GPU time it is (limits, fair share, accounting); the owner's default when None.
    project: str | None = None
    # Jobs that must SUCCEED first (ids fit every database's integer column).
    after: list[Annotated[int, Field(ge=1, le=MAX_ID)]] = Field(default_factory=list,
                                                                  max_length=1000)

    @field_validator("command", mode="before")
    @classmethod
    def _not_blank(cls, value: object) -> object:
        # Before the length check, so that an empty command gets the message with the fix;
        # a command of quotes alone (`gpuq submit -- ''`) runs nothing either.
        if isinstance(value, str) and not value.replace("'", "").replace('"', "").strip():
            raise ValueError("the command is empty; give one after `--`, e.g. -- python train.py")
        return value

    @field_validator("command")
    @classmethod
    def _not_too_long(cls, value: str) -> str:
        size = len(value.encode(errors="surrogatepass"))
        if size > MAX_COMMAND_BYTES:
            raise ValueError(f"the command is {size:,} bytes, over the limit of "
                             f"{MAX_COMMAND_BYTES:,}; put a long command in a script file and "
                             "submit the command that runs it, e.g. -- bash job.sh")
        return value

    @field_validator("command", "name", "workdir", "venv", "conda_env", "preflight",
                     mode="before")
    @classmethod
    def _storable_text(cls, value: object) -> object:
        # Before pydantic's own check, whose message for bytes that are not UTF-8 names no fix.
        if isinstance(value, str):
            _check_text(value)
        return value

    @field_validator("name")
    @classmethod
    def _a_name_to_show(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if len(value) > MAX_NAME_CHARS:
            raise ValueError(f"the name is {len(value):,} characters, over the limit of "
                             f"{MAX_NAME_CHARS}; give a shorter --name")
        if has_control(value):
            raise ValueError("the name holds a control character (a newline, an escape); "
                             "give a --name of printable characters")
        return value

    @field_validator("workdir", "venv", "conda_env", "preflight")
    @classmethod
    def _a_path_length(cls, value: str | None) -> str | None:
        if value is not None and len(value) > MAX_PATH_CHARS:
            raise ValueError(f"is {len(value):,} characters, over the limit of "
                             f"{MAX_PATH_CHARS:,} (PATH_MAX)")
        return value

    @field_validator("env")
    @classmethod
    def _environment_names(cls, value: dict[str, str]) -> dict[str, str]:
        size = sum(len(k.encode(errors="surrogatepass")) + len(v.encode(errors="surrogatepass"))
                   for k, v in value.items())
        if len(value) > MAX_ENV_VARS or size > MAX_ENV_BYTES:
            raise ValueError(f"the environment has {len(value):,} variables of {size:,} bytes, "
                             f"over the limit of {MAX_ENV_VARS:,} variables or "
                             f"{MAX_ENV_BYTES:,} bytes; pass large values in a file the job "
                             "reads")
        for name, text in value.items():
            if not name or "=" in name or "\0" in name or "\0" in text:
                raise ValueError(f"bad variable {name!r}: a name is not empty and holds no "
                                 "'=' or NUL, and a value holds no NUL")
            _check_text(name)
            _check_text(text)
        return value

    @field_validator("time_limit_s", mode="before")
    @classmethod
    def _a_duration(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_duration(value)
        return value

    @field_validator("signal")
    @classmethod
    def _a_signal(cls, value: str | None) -> str | None:
        return None if value is None else signal_text(*parse_signal(value))

    @field_validator("project")
    @classmethod
    def _plain_project(cls, value: str | None) -> str | None:
        if value is not None and (problem := plain_name_problem("project", value)):
            raise ValueError(problem)
        return value

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value not in ("command", "function"):
            raise ValueError("kind is 'command' or 'function'")
        return value

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in BACKENDS:
            raise ValueError(f"unknown backend {value!r}; choose one of {', '.join(BACKENDS)}")
        return value

    @field_validator("after")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        return sorted(set(value))

    @model_validator(mode="after")
    def _allowed_gpus_can_hold_the_job(self) -> JobSpec:
        ids = self.allowed_gpu_ids
        if ids is None:
            return self
        if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise ValueError("--gpu-ids takes distinct GPU indices from 0, e.g. 0,3")
        if len(ids) < self.gpus:
            raise ValueError(f"--gpu-ids names {len(ids)} GPUs but the job asks for "
                             f"{self.gpus}; name at least {self.gpus} or lower --gpus")
        return self

    @model_validator(mode="after")
    def _dependencies_stay_local(self) -> JobSpec:
        check_dependencies_allowed(self.backend, self.after)
        return self

    @classmethod
    def parse(cls, data: dict[str, Any]) -> JobSpec:
        """Validate user input, turning pydantic's report into one InvalidJobSpec line."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}"
                for err in e.errors()
            )
            raise InvalidJobSpec(f"invalid job: {problems}") from e

    def content_hash(self) -> str:
        """Hash of what makes two jobs the same work (for duplicate prevention)."""
        key = self.model_dump(include={"command", "env", "gpus", "workdir", "backend",
                                       "venv", "conda_env", "allowed_gpu_ids", "preflight",
                                       "kind", "payload_key"})
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _check_text(value: str) -> None:
    """Refuse text no database stores and no process takes: a NUL, or bytes that are not
    UTF-8 (a shell's `$'\\xff'` reaches Python as lone surrogates)."""
    if "\0" in value:
        raise ValueError("holds a NUL character, which no command or path may hold")
    try:
        value.encode()
    except UnicodeEncodeError as e:
        raise ValueError(f"holds bytes that are not UTF-8 (at character {e.start}); gpuq "
                         "stores text as UTF-8: rename or re-encode it") from None


__all__ = ["JOB_OPTIONS", "MAX_COMMAND_BYTES", "JobOption", "JobSpec"]
