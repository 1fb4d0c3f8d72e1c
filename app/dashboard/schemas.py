"""The dashboard API's request and response models: the OpenAPI schema is built from them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    create_model,
    model_validator,
)
from pydantic.fields import FieldInfo

from app.core.backends import BACKENDS
from app.store.jobs import JobSpec, check_dependencies_allowed

# Limits that keep ids and offsets inside every database's integer columns.
MAX_ID = 2**31 - 1
MAX_LAUNCH_REPLICAS = 10_000
# Fields of a job spec that gpuq sets itself; a user never sends them.
INTERNAL_SPEC_FIELDS = {"origin", "kind", "payload_key"}


class ErrorBody(BaseModel):
    """A refused request: the GpuqError's code and its message naming the fix."""

    code: str
    message: str


class JobRow(BaseModel):
    id: int
    name: str | None
    launch_id: int | None
    rank: int
    num_jobs: int
    status: str
    reason: str | None
    command: str
    exit_code: int | None
    gpus: int
    gpu_ids: list[int] | None
    host: str | None
    priority: int
    backend: str
    backend_id: str | None
    submitted_at: str | None
    started_at: str | None
    ended_at: str | None
    restart_count: int
    duration_s: float | None


class JobPage(BaseModel):
    jobs: list[JobRow]
    total: int = Field(description="Jobs that match the filters, on every page.")
    limit: int
    offset: int


class Event(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    at: float = Field(description="UTC epoch seconds.")
    from_state: str | None = Field(alias="from")
    to: str
    reason: str | None


class JobDetail(JobRow):
    env: dict[str, str] = Field(description="The job's own variables, secrets masked.")
    pid: int | None
    tmux: bool
    preflight: str | None
    after: list[int] | None = Field(description="Jobs that must SUCCEED before it starts.")
    events: list[Event]


class LaunchRow(BaseModel):
    id: int
    name: str | None
    num_jobs: int
    command: str
    counts: dict[str, int] = Field(description="Replicas per state.")
    done: int = Field(description="Replicas in a terminal state.")


class Launches(BaseModel):
    launches: list[LaunchRow]


class Reading(BaseModel):
    """The monitor's latest reading of one GPU."""

    memory_used_mb: int
    memory_total_mb: int
    utilization_pct: int
    process_count: int = 0
    mig: bool = False
    foreign: bool = Field(False, description="Used by processes outside gpuq.")
    at: float | None = Field(None, description="When it was read, UTC epoch seconds.")


class Gpu(BaseModel):
    index: int
    name: str | None = None
    memory_total_mb: int | None = None
    provider: str | None = None
    alive: bool = Field(description="Its worker's heartbeat is current.")
    job_id: int | None = Field(description="The job holding it.")
    reading: Reading | None


class Host(BaseModel):
    host: str
    gpus: list[Gpu]
    workers_alive: int
    stale: bool = Field(description="Some of its GPU workers stopped sending heartbeats.")


class ProgramExits(BaseModel):
    host: str
    program: str = Field(description="A program of `gpuq up` or `gpuq worker` that exited.")
    exits: int
    exits_in_window: int = Field(description="Exits within the last window_s seconds.")
    window_s: float
    exit_code: int = Field(description="Its last exit code (negative: killed by that signal).")
    last_exit_at: float
    backoff_s: float = Field(description="Wait before its next restart.")
    crash_loop: bool


class Status(BaseModel):
    hosts: list[Host]
    counts: dict[str, int] = Field(description="Jobs per state.")
    stale_workers: list[str] = Field([], description="host/gpuN whose heartbeat stopped.")
    programs: list[ProgramExits] = Field([], description="Supervised programs that exited "
                                         "lately; crash_loop marks those that keep dying.")
    flower: str | None = Field(None, description="Where Flower listens.")
    dashboard: str | None = Field(None, description="Where the dashboard listens.")


class Logs(BaseModel):
    text: str
    offset: int = Field(description="Byte offset to continue from.")
    status: str
    where: str | None = Field(description="Where a batch backend keeps the output instead.")


class CancelResult(BaseModel):
    cancelled: list[int] = Field(description="Jobs that ended CANCELLED now.")
    cancelling: list[int] = Field(description="Running jobs told to stop.")


class Submitted(BaseModel):
    job_ids: list[int]
    launch_id: int | None


# Text a database column can hold (PostgreSQL refuses NUL), and a command that is not blank.
Text = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]
Command = Annotated[str, StringConstraints(pattern=r"^[^\x00]*[^\x00\s][^\x00]*$")]
EnvName = Annotated[str, StringConstraints(pattern=r"^[^=\x00]+$")]
TEXT_TYPES: dict[str, Any] = {
    "command": Command, "name": Text | None, "workdir": Text | None, "venv": Text | None,
    "conda_env": Text | None, "preflight": Text | None, "env": dict[EnvName, Text],
    "backend": Literal[BACKENDS],
}


def _user_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, field in JobSpec.model_fields.items():
        if name in INTERNAL_SPEC_FIELDS:
            continue
        annotation = TEXT_TYPES.get(name, field.annotation)
        extra = {"json_schema_extra": {"additionalProperties": False}} if name == "env" else {}
        fields[name] = (annotation,
                        FieldInfo.merge_field_infos(field, annotation=annotation, **extra))
    return fields


# The fields and limits of JobSpec, one source of truth; JobSpec.parse checks the rest.
_JobOptionsBase: Any = create_model("_JobOptionsBase", __config__=ConfigDict(extra="forbid"),
                                    **_user_fields())


def _check_text(value: Any) -> None:
    if isinstance(value, str):
        value.encode()  # a lone surrogate cannot be stored
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key)
            _check_text(item)
    elif isinstance(value, list):
        for item in value:
            _check_text(item)


class JobOptions(_JobOptionsBase):  # type: ignore[misc]
    """A job as `gpuq submit` takes it."""

    @model_validator(mode="after")
    def _storable_text(self) -> JobOptions:
        try:
            _check_text(self.model_dump())
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode") from None
        fields = self.model_dump(include={"backend", "after"})  # fields copied from JobSpec
        check_dependencies_allowed(fields["backend"], fields["after"])
        return self


class SubmitRequest(JobOptions):
    allow_duplicate: bool = Field(False, description="Queue it even if an identical job has "
                                  "not ended.")


class LaunchRequest(JobOptions):
    num_jobs: int = Field(ge=1, le=MAX_LAUNCH_REPLICAS, description="Replicas; each sees "
                          "GPUQ_JOB_RANK and GPUQ_NUM_JOBS.")
