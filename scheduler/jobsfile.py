"""The jobs file: one job per line, re-read when it changes, each line submitted once.

Syntax of a line (blank lines and lines starting with `#` are skipped):

    [option=value ...] -- command args...
    command args...                      (no ` -- `: the whole line is the command)

Options are those of `gpuq submit` (app/store/spec.py), with _ for -: gpus, name,
priority, workdir, venv, conda_env, max_restarts, recover_on_exit_codes (137,143), gpu_ids
(0,3), preflight, tmux (true/false), backend, after (4,9); and env.KEY=VALUE
(repeatable). Values are shell-quoted as on a command line: name='sweep a'.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shlex
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.errors import InvalidJobSpec, JobsFileError
from app.store.spec import JOB_OPTIONS, JobSpec

log = logging.getLogger(__name__)

BY_KEY = {option.file_key: option for option in JOB_OPTIONS if option.kind != "env"}
KNOWN = sorted([*BY_KEY, "env.KEY"])


def _option(spec: dict[str, Any], key: str, value: str, lineno: int) -> None:
    """One `key=value` word of a line, read as the same option of `gpuq submit` reads it."""
    if key.startswith("env.") and len(key) > 4:
        spec.setdefault("env", {})[key[4:]] = value
        return
    option = BY_KEY.get(key)
    if option is None:
        raise JobsFileError(f"unknown option {key!r}; known: {', '.join(KNOWN)}", lineno)
    try:
        spec[option.field] = option.parse(value)
    except ValueError as e:
        raise JobsFileError(str(e), lineno) from None


def parse_line(text: str, lineno: int) -> dict[str, Any] | None:
    """A job spec for one line, None for a blank or comment line; JobsFileError if bad."""
    line = text.strip()
    if not line or line.startswith("#"):
        return None
    separator = re.search(r"(?:^|\s)--(?:\s|$)", line)
    head, command = (line[: separator.start()], line[separator.end():]) if separator else (
        "", line)
    spec: dict[str, Any] = {"command": command.strip()}
    try:
        words = shlex.split(head)
    except ValueError as e:
        raise JobsFileError(f"cannot read the options: {e}", lineno) from None
    for word in words:
        key, eq, value = word.partition("=")
        if not eq:
            raise JobsFileError(f"options are key=value before ` -- `, got {word!r}", lineno)
        _option(spec, key, value, lineno)
    try:
        JobSpec.parse(spec)
    except InvalidJobSpec as e:
        raise JobsFileError(str(e), lineno) from None
    return spec


@dataclass
class PollResult:
    submitted: list[int] = field(default_factory=list)  # new job ids
    known: int = 0  # lines already submitted before
    errors: list[str] = field(default_factory=list)  # one message per bad line


SubmitMany = Callable[[str, list[dict[str, Any]]], dict[str, Any]]


class JobsFileWatcher:
    """Re-reads a file when its mtime or size changes and submits the lines not yet seen.

    Lines already handled are remembered in a bounded LRU; the database (the jobs' origin
    and content hash) is the truth, so a restarted watcher submits nothing twice."""

    def __init__(self, path: Path, submit_many: SubmitMany, remember: int = 10_000) -> None:
        self.path = path.resolve()
        self.submit_many = submit_many
        self.remember = remember
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._stamp: tuple[int, int] | None = None

    def _changed(self) -> bool:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return False
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True

    def _remember(self, key: str) -> None:
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > self.remember:
            self._seen.popitem(last=False)

    def poll(self) -> PollResult | None:
        """Handle the file if it changed since the last poll; None when it did not."""
        if not self._changed():
            return None
        result = PollResult()
        fresh: list[tuple[str, dict[str, Any]]] = []
        for lineno, text in enumerate(self.path.read_text().splitlines(), start=1):
            try:
                spec = parse_line(text, lineno)
            except JobsFileError as e:
                result.errors.append(str(e))
                continue
            if spec is None:
                continue
            key = hashlib.sha256(text.strip().encode()).hexdigest()
            if key in self._seen:
                result.known += 1
                continue
            fresh.append((key, spec))
        if fresh:
            answer = self.submit_many(str(self.path), [spec for _, spec in fresh])
            result.submitted = answer["submitted"]
            result.known += answer["known"]
            for key, _ in fresh:
                self._remember(key)
        for error in result.errors:
            log.warning("%s: %s", self.path, error)
        return result
