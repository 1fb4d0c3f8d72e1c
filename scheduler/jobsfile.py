"""The jobs file: one job per line, re-read when it changes, each line submitted once.

Syntax of a line (blank lines and lines starting with `#` are skipped):

    [option=value ...] -- command args...
    command args...                      (no ` -- `: the whole line is the command)

Options are those of `gpuq submit` (app/store/spec.py), with _ for -: gpus, name,
priority, workdir, venv, conda_env, max_restarts, recover_on_exit_codes (137,143), gpu_ids
(0,3), preflight, tmux (true/false), backend, after (4,9), time (2h, 1-00:00:00: the time
limit), signal (USR2@90); and env.KEY=VALUE (repeatable). Values are shell-quoted as on
a command line: name='sweep a'.

Each line is submitted once for as long as it stays in the file (app/store/file_jobs.py),
however long ago its job ended and whether or not retention pruned it: a line is the same
job as before when its command, environment, resources and `name=` are; two lines that
differ only in `name=` are two jobs, and a renamed line is a new job. A changed
`priority=` is applied to the line's job while it is PENDING and reported as not applied
once it has started. A line that leaves the file is forgotten once the file has stayed
the same for one poll (a save in progress may show part of it), so that the line put back
later is submitted again.
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
from app.core.job_options import JOB_OPTIONS
from app.store.file_jobs import line_key
from app.store.spec import JobSpec

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
    parsed = _parse(text, lineno)
    return None if parsed is None else parsed[0]


def _parse(text: str, lineno: int) -> tuple[dict[str, Any], str] | None:
    """A line's job spec and its line key (app/store/file_jobs.py), None for a blank or
    comment line; JobsFileError if bad."""
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
        key = line_key(JobSpec.parse(spec))
    except InvalidJobSpec as e:
        raise JobsFileError(str(e), lineno) from None
    return spec, key


@dataclass
class PollResult:
    submitted: list[int] = field(default_factory=list)  # new job ids
    known: int = 0  # lines already submitted before
    errors: list[str] = field(default_factory=list)  # one message per bad line
    notes: list[str] = field(default_factory=list)  # edits applied or not applied
    forgotten: int = 0  # lines that left the file, forgotten: put back, they run again


# The `submit_many` operation: (origin, specs, present=line keys of the whole file,
# forget=whether to forget the lines stored before that are not among them).
SubmitMany = Callable[..., dict[str, Any]]
Line = tuple[int, bytes]  # (line number, its bytes without the newline)
Fresh = tuple[str, int, str, dict[str, Any]]  # (LRU key, line number, text, job spec)


def _shown(text: str, limit: int = 80) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


class JobsFileWatcher:
    """Re-reads a file when its mtime or size changes and submits the lines not yet seen.

    Lines already handled are remembered in a bounded LRU; the database (the file's known
    lines, app/store/file_jobs.py) is the truth, so a restarted watcher submits nothing
    twice. Each read tells the server which lines the file holds; once the file has stayed
    the same for a poll, the lines stored before that left it are forgotten.

    Only whole lines are submitted: a last line without its newline may be a save in
    progress, so it is held until the file has stayed the same for one more poll. A bad
    line (unreadable, not UTF-8, or refused by the server) is reported by number and text
    and the other lines go in; it is read again whenever the file changes."""

    def __init__(self, path: Path, submit_many: SubmitMany, remember: int = 10_000,
                 log_problems: bool = True) -> None:
        """`log_problems`: log bad lines and notes (False: the caller shows the result)."""
        self.path = path.resolve()
        self.log_problems = log_problems
        self.submit_many = submit_many
        self.remember = remember
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._stamp: tuple[int, int] | None = None
        self.held: Line | None = None  # an unfinished last line, waiting for a stable file
        self._texts: set[str] | None = None  # the LRU keys of the file's lines, last read
        self._present: list[str] | None = None  # its line keys, while some are to forget

    @property
    def settled(self) -> bool:
        """Whether every line is handled: none held, and none that left the file still
        to forget (both wait for the file to stay the same for a poll)."""
        return self.held is None and self._present is None

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

    def _read(self, result: PollResult) -> list[Line] | None:
        """The file's whole lines, numbered; the last one held when it has no newline."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:  # replaced by a save in progress: read it when it is back
            self._stamp = None
            return None
        except OSError as e:
            result.errors.append(f"cannot read it: {e.strerror}; fix its permissions")
            return None
        pieces = data.split(b"\n")
        tail = pieces.pop()
        self.held = (len(pieces) + 1, tail) if tail.strip() else None
        return list(enumerate(pieces, start=1))

    def poll(self) -> PollResult | None:
        """Handle the file if it changed since the last poll, or its held last line and the
        lines that left it once the file stayed the same; None when there was nothing to
        do."""
        result = PollResult()
        if self._changed():
            lines = self._read(result)
            if lines is None:
                return result if result.errors else None
            self._handle(lines, result)
        elif self.settled or not self._settle(result):
            return None
        if self.log_problems:
            for error in result.errors:
                log.warning("%s: %s", self.path, error)
            for note in result.notes:
                log.info("%s: %s", self.path, note)
        return result

    def _settle(self, result: PollResult) -> bool:
        """The file stayed the same: submit its held last line, forget the lines that left
        it; whether anything happened."""
        if self.held is not None:
            held, self.held = self.held, None
            fresh, _ = self._fresh([held], result, texts=set())
            if fresh:
                self._submit(fresh, result)
        if self._present is not None:
            self._forget(result)
        return result != PollResult()

    def _handle(self, lines: list[Line], result: PollResult) -> None:
        """A new read: submit its new lines, and learn whether lines stored before left."""
        texts: set[str] = set()
        fresh, present = self._fresh(lines, result, texts)
        if self.held is not None:  # part of the file: whole or not, its line is there
            _, held_keys = self._fresh([self.held], PollResult(), texts, hold=True)
            present.extend(held_keys)
        left = self._texts is None or not texts >= self._texts or self._present is not None
        self._texts = texts
        # A line not in the file is not taken as handled: put back, the server judges it.
        for key in [k for k in self._seen if k not in texts]:
            del self._seen[key]
        if not fresh and not left:
            return
        answer = self._submit(fresh, result, present=present)
        self._present = present if answer.get("absent") else None

    def _fresh(self, lines: list[Line], result: PollResult, texts: set[str],
               hold: bool = False) -> tuple[list[Fresh], list[str]]:
        """The lines not handled before, parsed (bad ones go to `result.errors`), and the
        line key of every good line; each line's text key goes to `texts`."""
        fresh: list[Fresh] = []
        present: list[str] = []
        for lineno, raw in lines:
            try:
                text = raw.decode()
            except UnicodeDecodeError as e:
                result.errors.append(f"line {lineno}: byte {e.start + 1} is not UTF-8 "
                                     "(bytes from a save in progress, or another encoding); "
                                     "save the file as UTF-8")
                continue
            try:
                parsed = _parse(text, lineno)
            except JobsFileError as e:
                result.errors.append(f"{e}; the line: {_shown(text)}")
                continue
            if parsed is None:
                continue
            spec, line = parsed
            present.append(line)
            key = hashlib.sha256(text.strip().encode()).hexdigest()
            texts.add(key)
            if hold:
                continue
            if key in self._seen:
                result.known += 1
                continue
            fresh.append((key, lineno, text, spec))
        return fresh, present

    def _submit(self, fresh: list[Fresh], result: PollResult,
                present: list[str] | None = None) -> dict[str, Any]:
        more = {} if present is None else {"present": present}
        answer = self.submit_many(str(self.path), [spec for *_, spec in fresh], **more)
        for (key, lineno, text, _), line in zip(fresh, answer["lines"], strict=True):
            status = line["status"]
            if status == "refused":  # not remembered: read again when the file changes
                result.errors.append(f"line {lineno}: {line['message']}; the line: "
                                     f"{_shown(text)}")
                continue
            self._remember(key)
            if status == "submitted":
                result.submitted.append(line["job_id"])
                continue
            result.known += 1
            if line.get("message"):
                result.notes.append(f"line {lineno}: {line['message']}")
        return answer

    def _forget(self, result: PollResult) -> None:
        """Forget the lines that left the file, here and in the database: put back, they
        are new lines."""
        answer = self.submit_many(str(self.path), [], present=self._present, forget=True)
        self._present = None
        result.forgotten = int(answer.get("absent") or 0)
