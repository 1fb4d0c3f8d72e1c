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
from app.core.durations import DURATION_PATTERN, MAX_TIME_S, SIGNAL_PATTERN
from app.core.text import (
    MAX_ENV_VARS,
    MAX_NAME_CHARS,
    MAX_PATH_CHARS,
    MAX_PLAIN_CHARS,
    NAME_PATTERN,
    PLAIN_NAME,
)
from app.store.spec import JobSpec, check_dependencies_allowed

MAX_LAUNCH_REPLICAS = 10_000
# Fields of a job spec that gpuq sets itself; a user never sends them.
INTERNAL_SPEC_FIELDS = {"kind", "payload_key"}


class ErrorBody(BaseModel):
    """A refused request: the GpuqError's code and its message naming the fix."""

    code: str
    message: str


# Text a database column can hold (PostgreSQL refuses NUL), and a command that is not blank.
Text = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]
Command = Annotated[str, StringConstraints(pattern=r"^[^\x00]*[^\x00\s][^\x00]*$")]
EnvName = Annotated[str, StringConstraints(pattern=r"^[^=\x00]+$")]
# A name: printable (app/core/text.py), and short; a path: at most PATH_MAX characters.
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=MAX_NAME_CHARS)]
PathText = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$", max_length=MAX_PATH_CHARS)]
Duration = Annotated[str, StringConstraints(pattern=DURATION_PATTERN)]
Project = Annotated[str, StringConstraints(pattern=f"^{PLAIN_NAME.pattern}$",
                                           max_length=MAX_PLAIN_CHARS)]
TEXT_TYPES: dict[str, Any] = {
    "command": Command, "name": Name | None, "workdir": PathText | None,
    "venv": PathText | None, "conda_env": PathText | None, "preflight": PathText | None,
    "env": Annotated[dict[EnvName, Text], Field(max_length=MAX_ENV_VARS)],
    "backend": Literal[BACKENDS], "project": Project | None,
    # Seconds, or a duration as `--time` takes it ("2h", "1-00:00:00"); JobSpec reads both.
    "time_limit_s": Annotated[int, Field(ge=1, le=MAX_TIME_S)] | Duration | None,
    "signal": Annotated[str, StringConstraints(pattern=SIGNAL_PATTERN)] | None,
}


def _user_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, field in JobSpec.model_fields.items():
        if name in INTERNAL_SPEC_FIELDS:
            continue
        annotation = TEXT_TYPES.get(name, field.annotation)
        extra = {"json_schema_extra": {"additionalProperties": False}} if name == "env" else {}
        if name == "time_limit_s":  # its bounds are the integer's, in the annotation
            field = FieldInfo(default=None, description="Seconds, or a duration such as 2h.")
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
