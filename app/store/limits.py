"""Limits and fair-share weights per user and per project, set by an admin (`gpuq limits
set`, the `limits` table) or in a TOML file (GPUQ_LIMITS_FILE, else limits.toml in the
home), and the pending limit checked at submission.

An entry holds any of max_gpus (GPUs its jobs may hold at once), max_pending (jobs it may
have PENDING), max_cpu_jobs (0-GPU jobs it may run at once), max_priority (the highest
priority its jobs may be submitted at), max_time_s and default_time_s (the longest time
limit its jobs may ask for, and the limit of those that ask for none; the file takes
durations, max_time = "2d"), weight (fair share: twice the weight, twice the GPU time) and,
for a user, default_project. The name `*` is the default of every user (or
project) without an entry of its own; a field an entry leaves unset falls back to `*`'s,
then to no limit (a named user's max_priority: 0), weight 1 and the owner's own name as
project. The database wins over the file field by field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col

from app.core.durations import MAX_TIME_S, format_duration, parse_duration
from app.core.errors import InvalidArguments, OverLimit
from app.core.settings import Settings
from app.core.states import JobState
from app.core.text import plain_name_problem
from app.store.jobs import serialize
from app.store.models import Job, Limit

log = logging.getLogger(__name__)

LIMITS = Limit.__table__  # type: ignore[attr-defined]
KINDS = ("user", "project")
FIELDS = ("max_gpus", "max_pending", "max_cpu_jobs", "weight", "default_project",
          "max_priority", "max_time_s", "default_time_s")
# The file's names of the time fields, which take a duration ("2d") as `--time` does.
FILE_DURATIONS = {"max_time": "max_time_s", "default_time": "default_time_s"}
# A named user's max_priority where no entry sets one: they may not jump the queue
# unless an admin grants it.
USER_MAX_PRIORITY = 0
EVERYONE = "*"


def check_project(name: str) -> str:
    """Refuse a project name that is not short and plain, naming the rule."""
    if (problem := plain_name_problem("project name", name)) is not None:
        raise InvalidArguments(problem)
    return name


@dataclass(frozen=True)
class Entry:
    max_gpus: int | None = None
    max_pending: int | None = None
    max_cpu_jobs: int | None = None
    weight: float | None = None
    default_project: str | None = None
    max_priority: int | None = None
    max_time_s: int | None = None
    default_time_s: int | None = None

    def over(self, other: Entry) -> Entry:
        """This entry, its unset fields taken from `other`."""
        return Entry(**{f: getattr(self, f) if getattr(self, f) is not None
                        else getattr(other, f) for f in FIELDS})

    def fields(self) -> dict[str, Any]:
        return {f: v for f, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Limits:
    """Every entry, the file's under the database's: what one dispatch pass or one
    submission reads once."""

    entries: dict[tuple[str, str], Entry]

    def of(self, kind: str, name: str) -> Entry:
        own = self.entries.get((kind, name), Entry())
        return own.over(self.entries.get((kind, EVERYONE), Entry()))

    def weight(self, kind: str, name: str) -> float:
        weight = self.of(kind, name).weight
        return 1.0 if weight is None else weight

    def project_of(self, owner: str) -> str:
        return self.of("user", owner).default_project or owner

    def max_priority(self, kind: str, name: str) -> int | None:
        """The highest priority its jobs may be submitted at; None: no limit."""
        most = self.of(kind, name).max_priority
        return USER_MAX_PRIORITY if most is None and kind == "user" else most

    def time_limit(self, owner: str, project: str, asked: int | None) -> int | None:
        """The time limit a job of `owner` in `project` gets: the one it asked for; else
        the user's default_time, else the project's, else (as Slurm does) the lower
        max_time, never over a max_time. OverLimit, naming the limit, when it asked for
        more than the user's or the project's max_time."""
        user, group = self.of("user", owner), self.of("project", project)
        bounds = [(kind, name, entry.max_time_s) for kind, name, entry in
                  (("user", owner, user), ("project", project, group))
                  if entry.max_time_s is not None]
        if asked is None:
            default = (user.default_time_s if user.default_time_s is not None
                       else group.default_time_s)
            capped = [most for _, _, most in bounds]
            return min([default, *capped] if default is not None else capped, default=None)
        for kind, name, most in bounds:
            if asked > most:
                raise OverLimit(
                    f"{kind} {name}'s jobs may run at most {format_duration(most)} "
                    f"(max_time) and this one asks for {format_duration(asked)}: submit "
                    f"with --time {format_duration(most)} or less, or ask an admin to raise "
                    f"it (gpuq limits set --{kind} {name} --max-time T)")
        return asked


def check_entry(kind: str, name: str, values: dict[str, Any]) -> None:
    """Refuse an entry no limit can mean, naming the field and what it takes."""
    if kind not in KINDS:
        raise InvalidArguments(f"limits are per user or per project, not {kind!r}")
    if name != EVERYONE and (problem := plain_name_problem(f"{kind} name", name)):
        raise InvalidArguments(problem)
    for field, value in values.items():
        if field not in FIELDS:
            raise InvalidArguments(f"unknown limit {field!r}; the fields are "
                                   f"{', '.join(FIELDS)}")
        if value is not None:
            _check_value(kind, field, value)


def _check_value(kind: str, field: str, value: Any) -> None:
    if field in ("max_gpus", "max_pending", "max_cpu_jobs") and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise InvalidArguments(f"{field} takes a whole number of 0 or more, got {value!r}")
    if field == "max_priority" and (isinstance(value, bool) or not isinstance(value, int)
                                    or not -1000 <= value <= 1000):
        raise InvalidArguments(f"max_priority takes a whole number from -1000 to 1000 (a "
                               f"job's priorities), got {value!r}")
    if field == "weight" and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not 0 < value <= 1e6):
        raise InvalidArguments(f"weight takes a number above 0 (1 is everyone's), "
                               f"got {value!r}")
    if field in ("max_time_s", "default_time_s") and (
            isinstance(value, bool) or not isinstance(value, int)
            or not 1 <= value <= MAX_TIME_S):
        raise InvalidArguments(f"{field} takes whole seconds from 1 to {MAX_TIME_S} (a "
                               f"duration such as 2d on the command line), got {value!r}")
    if field == "default_project":
        if kind != "user":
            raise InvalidArguments("default_project is a user's, not a project's")
        if not isinstance(value, str):
            raise InvalidArguments("default_project takes a project name")
        check_project(value)


# The file is read again only when it changed: (path, mtime, size) -> entries.
_FILE_CACHE: dict[Path, tuple[tuple[float, int], dict[tuple[str, str], Entry]]] = {}


def limits_file(settings: Settings) -> Path:
    return settings.limits_file or settings.home / "limits.toml"


def _file_entries(settings: Settings) -> dict[tuple[str, str], Entry]:
    path = limits_file(settings)
    try:
        stat = path.stat()
    except FileNotFoundError:
        return {}
    mark = (stat.st_mtime, stat.st_size)
    cached = _FILE_CACHE.get(path)
    if cached is not None and cached[0] == mark:
        return cached[1]
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InvalidArguments(f"{path}: not TOML ({e}); fix the file or remove it") from None
    entries: dict[tuple[str, str], Entry] = {}
    for kind, table in data.items():
        if kind not in KINDS or not isinstance(table, dict):
            raise InvalidArguments(f"{path}: unknown table [{kind}]; write [user.NAME] or "
                                   "[project.NAME] tables")
        for name, values in table.items():
            if not isinstance(values, dict):
                raise InvalidArguments(f"{path}: [{kind}.{name}] must be a table of "
                                       f"{', '.join(FIELDS)}")
            try:
                values = _file_durations(values)
                check_entry(kind, name, values)
            except InvalidArguments as e:
                raise InvalidArguments(f"{path}: [{kind}.{name}]: {e}") from None
            entries[(kind, name)] = Entry(**values)
    _FILE_CACHE[path] = (mark, entries)
    return entries


def _file_durations(values: dict[str, Any]) -> dict[str, Any]:
    """A file entry's max_time and default_time ("2d", "4h") in seconds, under the fields'
    own names."""
    out = {k: v for k, v in values.items() if k not in FILE_DURATIONS}
    for key, field in FILE_DURATIONS.items():
        if key not in values:
            continue
        if not isinstance(values[key], str):
            raise InvalidArguments(f"{key} takes a duration in quotes, e.g. {key} = \"2d\"")
        try:
            out[field] = parse_duration(values[key], key)
        except ValueError as e:
            raise InvalidArguments(str(e)) from None
    return out


def read(conn: Connection | Session, settings: Settings, strict: bool = True) -> Limits:
    """Every entry. A limits file that cannot be read is refused in one line naming the
    fix when `strict` (`gpuq limits`); else (dispatch, submission) it is logged and left
    out, so that a typo in it stops no job from starting."""
    rows = conn.execute(select(LIMITS)).mappings().all()
    try:
        entries = dict(_file_entries(settings))
    except InvalidArguments as e:
        if strict:
            raise
        log.warning("limits file left out: %s", e)
        entries = {}
    for row in rows:
        key = (row["kind"], row["name"])
        entries[key] = Entry(**{f: row[f] for f in FIELDS}).over(entries.get(key, Entry()))
    return Limits(entries)


def write(conn: Connection, kind: str, name: str, values: dict[str, Any]) -> None:
    """Set the given fields of an entry (None clears one); the others stay as they were."""
    check_entry(kind, name, values)
    stmt = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(LIMITS)
    row = {"kind": kind, "name": name, **{f: None for f in FIELDS}, **values}
    conn.execute(stmt.values(row).on_conflict_do_update(
        index_elements=["kind", "name"], set_={f: stmt.excluded[f] for f in values}))
    conn.execute(delete(LIMITS).where(
        LIMITS.c.kind == kind, LIMITS.c.name == name,
        *(LIMITS.c[f].is_(None) for f in FIELDS)))


def remove(conn: Connection, kind: str, name: str) -> bool:
    """Drop an entry of the database (the file's stays); whether there was one."""
    return bool(conn.execute(delete(LIMITS).where(
        LIMITS.c.kind == kind, LIMITS.c.name == name)).rowcount)


def pending_of(session: Session, column: Any, name: str) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(
        column == name, col(Job.state) == JobState.PENDING.value)) or 0


def refuse_over_pending(session: Session, limits: Limits, owner: str, project: str,
                        adding: int) -> None:
    """Refuse `adding` jobs that would put their owner or project over its pending limit,
    naming the limit. Called in the transaction that stores them, after serializing on
    the owner, so that two submissions of one user never both pass the last places."""
    for kind, name, column in (("user", owner, col(Job.owner)),
                               ("project", project, col(Job.project))):
        limit = limits.of(kind, name).max_pending
        if limit is None:
            continue
        serialize(session, hashlib.sha256(f"pending:{kind}:{name}".encode()).hexdigest())
        pending = pending_of(session, column, name)
        if pending + adding > limit:
            raise OverLimit(
                f"{kind} {name} may have {limit:,} jobs pending (max_pending) and has "
                f"{pending:,}; these {adding:,} would make {pending + adding:,}: wait for "
                "some to start, cancel some, or ask an admin to raise it (gpuq limits set "
                f"--{kind} {name} --max-pending N)")
