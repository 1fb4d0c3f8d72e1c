"""What a request's JSON may hold: text that can be stored and answered. JSON's escapes can
spell a lone surrogate (`"\\ud800"`), which no UTF-8 encoder takes: left in, it fails
wherever it is first written (the database, a log, the answer echoing it back) as a 500."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from app.core.errors import InvalidArguments


def _unencodable(value: Any, where: str) -> str | None:
    """Where in `value` there is text that is not valid Unicode, if anywhere."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _unencodable(key, where) or _unencodable(item, f"{where}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _unencodable(item, f"{where}[{i}]")
            if found:
                return found
    return None


async def valid_unicode(request: Request) -> None:
    """Refuse, as one line, a JSON body with a lone surrogate: every route depends on this."""
    if request.method in ("GET", "HEAD", "OPTIONS", "DELETE"):
        return
    if "json" not in request.headers.get("content-type", ""):
        return
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return  # not JSON at all: the route's own validation answers 422
    where = _unencodable(body, "body")
    if where is not None:
        raise InvalidArguments(f"{where} holds text that is not valid Unicode (a lone "
                               "surrogate escape such as \\ud800); send UTF-8 text")


__all__ = ["valid_unicode"]


def absolute_workdir(workdir: object) -> None:
    """Refuse a relative `workdir`: the server's working directory is not the caller's, so
    a relative one would run the job somewhere the caller never meant."""
    if isinstance(workdir, str) and workdir and not workdir.startswith("/"):
        raise InvalidArguments(f"workdir {workdir!r} is relative; the server does not run in "
                               "your directory: send an absolute path (e.g. from os.getcwd())")


def check_specs(kwargs: dict[str, Any]) -> None:
    """Refuse relative workdirs in the job specs of an operation's arguments (`spec` of
    submit and launch, `specs` of submit_many)."""
    specs = kwargs.get("specs")
    for spec in [kwargs.get("spec"), *(specs if isinstance(specs, list) else [])]:
        if isinstance(spec, dict):
            absolute_workdir(spec.get("workdir"))
