"""Job options are declared once (app/core/job_options.py): `gpuq submit`, `gpuq launch`, the
jobs file and the dashboard's request model all take every one of them, and read the same
text as the same value."""

from __future__ import annotations

from typing import Any

import typer
from typer.testing import CliRunner

from app.cli.main import cli
from app.cli.options import job_options
from app.core.errors import GpuqError
from app.dashboard.schemas import INTERNAL_SPEC_FIELDS, JobOptions
from app.store.spec import JOB_OPTIONS, JobSpec
from scheduler.jobsfile import parse_line

# One value per option, as text on a command line and in a jobs file.
GIVEN = {"gpus": "2", "name": "sweep", "priority": "5", "workdir": "/srv/run",
         "venv": "/opt/venv", "conda-env": "torch", "max-restarts": "3",
         "recover-on-exit-codes": "137,143", "gpu-ids": "0,3", "preflight": "nccl",
         "backend": "local", "after": "4,9", "project": "vision", "time": "1-02:00:00",
         "signal": "usr2@90"}


def _options_from_the_command_line(args: list[str]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    app = typer.Typer()

    @app.command()
    @job_options
    def probe(options: dict[str, Any]) -> None:
        seen.update(options)

    @app.command()
    def other() -> None:  # two commands, so that `probe` is named on the command line
        pass

    result = CliRunner().invoke(app, ["probe", *args])
    assert result.exit_code == 0, result.output
    return seen


def test_submit_and_launch_offer_every_job_option_and_nothing_is_left_out():
    fields = {o.field for o in JOB_OPTIONS}
    assert fields == set(JobSpec.model_fields) - INTERNAL_SPEC_FIELDS - {"command"}
    for name in ("submit", "launch"):
        command = typer.main.get_command(cli).commands[name]  # type: ignore[attr-defined]
        flags = {flag for p in command.params for flag in p.opts}
        assert {f"--{o.flag}" for o in JOB_OPTIONS} <= flags, name


def test_the_command_line_and_the_jobs_file_read_each_option_alike():
    args = [word for flag, text in GIVEN.items() for word in (f"--{flag}", text)]
    args += ["--env", "LR=3e-4", "--env", "SEED=1", "--tmux"]
    cli_options = _options_from_the_command_line(args)
    words = [f"{flag.replace('-', '_')}={text}" for flag, text in GIVEN.items()]
    line = " ".join([*words, "env.LR=3e-4", "env.SEED=1", "tmux=true", "--", "python a.py"])
    file_spec = parse_line(line, 1)
    assert file_spec is not None
    assert {k: v for k, v in file_spec.items() if k != "command"} == cli_options
    assert cli_options["recover_exit_codes"] == [137, 143]
    assert (cli_options["time_limit_s"], cli_options["signal"]) == (93600, "USR2@90")
    assert cli_options["env"] == {"LR": "3e-4", "SEED": "1"}


def test_defaults_are_the_specs_and_a_relative_workdir_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = _options_from_the_command_line(["--workdir", "runs"])
    assert options["workdir"] == str((tmp_path / "runs").resolve())
    defaults = JobSpec(command="x")
    # What the command line gives unasked makes the spec's defaults, as the client sends
    # it (the options it leaves None are left to JobSpec) ...
    given = {k: v for k, v in options.items() if v is not None and k != "workdir"}
    assert JobSpec(command="x", **given) == defaults
    # ... and each default the help shows is the spec's own.
    for option in JOB_OPTIONS:
        spec_default = getattr(defaults, option.field)
        if option.default is None:
            assert spec_default in (None, [], {}), option.field
        else:
            assert option.default == spec_default, option.field


def test_the_dashboard_takes_every_job_option():
    assert {o.field for o in JOB_OPTIONS} | {"command"} == set(JobOptions.model_fields)


def test_bad_option_text_is_one_line_naming_the_option():
    result = CliRunner().invoke(cli, ["submit", "--gpu-ids", "0,x", "--", "true"])
    assert isinstance(result.exception, GpuqError)
    assert str(result.exception) == ("--gpu-ids takes comma-separated integers, e.g. 0,3; "
                                     "got '0,x'")
