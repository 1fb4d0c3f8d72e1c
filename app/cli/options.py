"""The job options of `gpuq submit` and `gpuq launch`, made from JOB_OPTIONS (app/core/
job_options.py): an option added there is on both commands, with its help, default and
parsing."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_type_hints

import typer

from app.core.errors import GpuqError
from app.core.job_options import JOB_OPTIONS, JobOption

_TYPES: dict[str, Any] = {"int": int, "text": str | None, "path": str | None,
                          "ints": str | None, "env": list[str], "flag": bool,
                          "duration": str | None, "signal": str | None}
_METAVARS = {"int": "N", "text": "TEXT", "path": "DIR", "ints": "N,N", "env": "KEY=VALUE",
             "duration": "TIME", "signal": "SIG@SECONDS"}


def _cli_default(option: JobOption) -> Any:
    if option.repeatable:
        return []
    if option.kind in ("ints", "env"):
        return None
    return option.default


def _parameter(option: JobOption) -> inspect.Parameter:
    annotation = list[str] if option.repeatable else _TYPES[option.kind]
    return inspect.Parameter(
        option.field, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
        default=typer.Option(_cli_default(option), f"--{option.flag}", help=option.help,
                             metavar=_METAVARS.get(option.kind)))


def _value(option: JobOption, given: Any) -> Any:
    """The JobSpec field's value from what the command line gave for the option."""
    if option.kind in ("int", "flag"):  # typer has parsed these already
        return given
    texts = [text for text in (given if option.repeatable else [given]) if text]
    if not texts:
        return option.default
    try:
        values = [option.parse(text, cwd=Path.cwd()) for text in texts]
    except ValueError as e:
        raise GpuqError(f"--{e}") from None
    if option.kind == "env":
        return {k: v for value in values for k, v in value.items()}
    if option.kind == "ints":
        return [i for value in values for i in value]
    return values[0]


def job_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command every job option; it receives them as `options`, JobSpec's fields."""
    signature = inspect.signature(command)
    hints = get_type_hints(command)
    own = [p.replace(annotation=hints[p.name]) for p in signature.parameters.values()
           if p.name != "options"]
    added = [_parameter(option) for option in JOB_OPTIONS]

    @functools.wraps(command)
    def with_options(**given: Any) -> None:
        options = {o.field: _value(o, given.pop(o.field)) for o in JOB_OPTIONS}
        command(options=options, **given)

    parameters = own + added
    with_options.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=parameters, return_annotation=None)
    with_options.__annotations__ = {p.name: p.annotation for p in parameters}
    return with_options
