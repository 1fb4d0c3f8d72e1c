"""A time limit and its warning signal as people write them (`--time`, `--signal`): every
form reads as the seconds it means, and bad text is refused in one line naming the fix."""

from __future__ import annotations

import re
import signal

import pytest
from typer.testing import CliRunner

from app.cli.main import cli
from app.core.durations import (
    DURATION_PATTERN,
    MAX_TIME_S,
    format_duration,
    parse_duration,
    parse_signal,
    signal_number,
    slurm_time,
)
from app.core.errors import GpuqError, InvalidJobSpec
from app.store.spec import JobSpec


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("1.5h", 5400), ("2H", 7200),
    ("05:30", 330), ("1:00:00", 3600), ("12:34:56", 45296), ("1-00:00:00", 86400),
    ("2-03:04:05", 2 * 86400 + 3 * 3600 + 4 * 60 + 5), ("1-12", 86400 + 12 * 3600),
    ("1-00:30", 86400 + 1800), (" 45m ", 2700),
])
def test_every_form_reads_as_the_seconds_it_means(text, seconds):
    assert parse_duration(text) == seconds
    assert re.fullmatch(DURATION_PATTERN, text.strip().lower())


def test_a_bare_number_is_refused_naming_both_readings():
    with pytest.raises(ValueError) as refused:
        parse_duration("90")
    assert str(refused.value).startswith("time takes a unit or a clock: write 90m for minutes "
                                         "(as Slurm reads a bare number) or 90s for seconds")


@pytest.mark.parametrize("text", ["", "soon", "2w", "1:2:3:4", "-5m", "h", "1-", "2h30m"])
def test_text_that_is_no_duration_is_refused_naming_the_forms(text):
    with pytest.raises(ValueError, match="time takes a duration such as 90s, 30m, 2h, 1d, "
                                         "MM:SS, HH:MM:SS or D-HH:MM:SS"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["0s", "00:00", "367d"])
def test_a_limit_of_nothing_or_over_a_year_is_refused(text):
    with pytest.raises(ValueError, match=r"time takes from 1s to 366d"):
        parse_duration(text)


@pytest.mark.parametrize("seconds", [1, 59, 60, 90, 3600, 5400, 86400, 93784, MAX_TIME_S])
def test_a_shown_duration_reads_back_as_itself(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


def test_slurm_gets_whole_minutes_rounded_up():
    assert slurm_time(90) == "0-00:02:00"
    assert slurm_time(7200) == "0-02:00:00"
    assert slurm_time(86400 + 61) == "1-00:02:00"


@pytest.mark.parametrize(("text", "read"), [
    ("USR2@90", ("USR2", 90)), ("usr1@0", ("USR1", 0)), ("SIGTERM@30", ("TERM", 30))])
def test_a_signal_reads_as_its_name_and_lead(text, read):
    assert parse_signal(text) == read


def test_a_signal_is_sent_as_its_number():
    assert signal_number("USR2@90") == (int(signal.SIGUSR2), 90)


@pytest.mark.parametrize(("text", "says"), [
    ("USR2", "signal takes SIG@SECONDS, e.g. USR2@90"),
    ("USR2@soon", "signal takes SIG@SECONDS"),
    ("KILL@5", "signal takes one of USR1, USR2"),
    ("12@5", "signal takes one of USR1, USR2"),
    ("USR2@99999999", "signal's seconds are at most 9999999"),
])
def test_a_bad_signal_is_refused_naming_the_form(text, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_signal(text)


def test_the_spec_takes_a_duration_or_seconds_and_refuses_a_bare_number_in_one_line():
    assert JobSpec.parse({"command": "x", "time_limit_s": "2h"}).time_limit_s == 7200
    assert JobSpec.parse({"command": "x", "time_limit_s": 60}).time_limit_s == 60
    assert JobSpec.parse({"command": "x", "signal": "sigusr2@5"}).signal == "USR2@5"
    with pytest.raises(InvalidJobSpec) as refused:
        JobSpec.parse({"command": "x", "time_limit_s": "90"})
    assert "\n" not in str(refused.value)
    assert "write 90m for minutes" in str(refused.value)


def test_submit_refuses_a_bad_time_in_one_line_naming_the_option():
    result = CliRunner().invoke(cli, ["submit", "--time", "90", "--", "true"])
    assert isinstance(result.exception, GpuqError)
    assert str(result.exception).startswith("--time takes a unit or a clock: write 90m")
    result = CliRunner().invoke(cli, ["submit", "--signal", "USR2", "--", "true"])
    assert str(result.exception).startswith("--signal takes SIG@SECONDS")
