"""A job's time limit and its warning signal, as people write them: `--time 2h`,
`--signal USR2@90`. The standard library only: `gpuq submit` parses them before loading
pydantic, and the job's own helper (app/client/environment.py) reads the deadline.

A duration is a number with a unit (`90s`, `30m`, `2h`, `1d`) or a clock in Slurm's forms
(`MM:SS`, `HH:MM:SS`, `D-HH:MM:SS`, `D-HH`, `D-HH:MM`). A bare number is refused: Slurm
reads it as minutes, most other tools as seconds, and a limit read the wrong way kills a job
60 times too soon; the message names both spellings."""

from __future__ import annotations

import re
import signal

# A limit longer than a year is a typo, not a plan.
MAX_TIME_S = 366 * 86400

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_WITH_UNIT = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_CLOCK = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
FORMS = "90s, 30m, 2h, 1d, MM:SS, HH:MM:SS or D-HH:MM:SS"
# The forms as one pattern (the dashboard's schema); parse_duration also checks the range.
DURATION_PATTERN = (r"^([0-9]{1,6}(\.[0-9]{1,3})?[smhd]|[0-9]{1,3}-[0-9]{1,2}(:[0-9]{1,2}){0,2}"
                    r"|[0-9]{1,4}(:[0-9]{1,2}){1,2})$")
# Signals a job may ask for before its limit: those a program can catch and that stop
# nothing by default but what they are meant to.
SIGNALS = ("USR1", "USR2", "TERM", "INT", "HUP", "QUIT", "ALRM", "XCPU", "URG", "WINCH")
MAX_LEAD_S = 9_999_999
SIGNAL_PATTERN = rf"^(SIG)?({'|'.join(SIGNALS)})@[0-9]{{1,7}}$"


def parse_duration(text: str, what: str = "time") -> int:
    """Whole seconds from a duration as written; ValueError names the forms it takes."""
    given = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", given):
        raise ValueError(f"{what} takes a unit or a clock: write {given}m for minutes (as "
                         f"Slurm reads a bare number) or {given}s for seconds; forms: {FORMS}")
    seconds = _seconds(given)
    if seconds is None:
        raise ValueError(f"{what} takes a duration such as {FORMS}; got {text!r}")
    if not 1 <= seconds <= MAX_TIME_S:
        raise ValueError(f"{what} takes from 1s to {MAX_TIME_S // 86400}d; got {text!r}")
    return seconds


def _seconds(text: str) -> int | None:
    if (unit := _WITH_UNIT.match(text)) is not None:
        return round(float(unit[1]) * _UNITS[unit[2]])
    if (clock := _CLOCK.match(text)) is None or (":" not in text and "-" not in text):
        return None
    days, *parts = clock.groups()
    given = [int(p) for p in parts if p is not None]
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, secs = [*given, 0, 0][:3]
        return int(days) * 86400 + hours * 3600 + minutes * 60 + secs
    if len(given) == 2:  # MM:SS
        return given[0] * 60 + given[1]
    hours, minutes, secs = given
    return hours * 3600 + minutes * 60 + secs


def format_duration(seconds: float) -> str:
    """A duration as gpuq shows it: `45s`, `30m`, `2h`, `1d`, else Slurm's clock
    (`1-02:03:04`, `02:30:00`): each reads back through parse_duration as itself."""
    whole = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole and whole % size == 0:
            return f"{whole // size}{unit}"
    if whole < 60:
        return f"{whole}s"
    days, rest = divmod(whole, 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock}" if days else clock


def slurm_time(seconds: int) -> str:
    """Slurm's `--time`, D-HH:MM:SS; Slurm counts whole minutes, so a limit is rounded up."""
    minutes = -(-seconds // 60)
    days, rest = divmod(minutes, 1440)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00"


def parse_signal(text: str, what: str = "signal") -> tuple[str, int]:
    """`USR2@90` (as submitit and Slurm's --signal write it): the signal's name without SIG,
    and how many seconds before the limit it goes to the job; ValueError names the form."""
    name, at, seconds = text.strip().partition("@")
    name = name.upper().removeprefix("SIG")
    if not at or not seconds.isdigit() or not name:
        raise ValueError(f"{what} takes SIG@SECONDS, e.g. USR2@90 (SIGUSR2 90 s before the "
                         f"time limit); got {text!r}")
    if name not in SIGNALS:
        raise ValueError(f"{what} takes one of {', '.join(SIGNALS)} (a signal the job can "
                         f"catch), e.g. USR2@90; got {text!r}")
    if int(seconds) > MAX_LEAD_S:
        raise ValueError(f"{what}'s seconds are at most {MAX_LEAD_S}; got {text!r}")
    return name, int(seconds)


def signal_text(name: str, seconds: int) -> str:
    return f"{name}@{seconds}"


def signal_number(text: str) -> tuple[int, int]:
    """The signal's number and its lead in seconds, from a stored `--signal`."""
    name, seconds = parse_signal(text)
    return int(getattr(signal.Signals, f"SIG{name}")), seconds
