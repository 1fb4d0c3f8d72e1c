"""Deployment files: the Procfiles and the systemd units name real gpuq commands, run exactly
one beat, and the units restart with backoff and give up on a crash loop."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from app.core.settings import Settings
from app.stack.supervisor import read_procfile
from app.stack.up import default_procfile
from tests.support.servers import IN_CI, ROOT, missing

GPUQ = str(Path(sys.executable).parent / "gpuq")
SYSTEMD = ROOT / "deploy" / "systemd"
PROCFILES = [ROOT / "Procfile", *sorted((ROOT / "deploy").glob("Procfile.*"))]


@cache
def gpuq_subcommands() -> frozenset[str]:
    """The commands `gpuq --help` lists."""
    env = {**os.environ, "COLUMNS": "120", "TERM": "dumb"}
    shown = subprocess.run([GPUQ, "--help"], capture_output=True, text=True, env=env,
                           timeout=60, check=True).stdout
    commands = shown.split("Commands:", 1)[1]
    names = frozenset(re.findall(r"^\s+([a-z][a-z-]*)\s{2,}\S", commands, re.MULTILINE))
    assert {"worker", "status", "up"} <= names, shown
    return names


def _gpuq_subcommand(command: str) -> str:
    argv = shlex.split(command)
    assert Path(argv[0]).name == "gpuq", f"{command!r} does not run gpuq"
    assert argv[1] in gpuq_subcommands(), f"{command!r}: no such gpuq command"
    return argv[1]


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(path)
    return parser


def _services() -> dict[str, configparser.ConfigParser]:
    return {path.name: _unit(path) for path in sorted(SYSTEMD.glob("*.service"))}


@pytest.mark.parametrize("path", PROCFILES, ids=lambda p: p.name)
def test_every_procfile_line_runs_a_gpuq_command(path):
    programs = read_procfile(path)
    assert programs
    for program in programs:
        _gpuq_subcommand(program.command)


@pytest.mark.parametrize("path", PROCFILES, ids=lambda p: p.name)
def test_a_procfile_with_a_web_process_serves_flower_there(path):
    web = [p.command for p in read_procfile(path) if p.name == "web"]
    assert web in ([], ["gpuq flower"])


def test_one_host_procfiles_run_exactly_one_beat_and_a_cluster_too():
    def beats(name: str) -> int:
        path = ROOT / name
        return sum(_gpuq_subcommand(p.command) == "beat" for p in read_procfile(path))

    assert beats("Procfile") == beats("deploy/Procfile.dev") == 1
    # A cluster: one control host and any number of GPU hosts.
    assert beats("deploy/Procfile.control") == 1 and beats("deploy/Procfile.gpu-host") == 0


def test_gpuq_up_runs_the_development_procfile_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_procfile() == ROOT / "deploy" / "Procfile.dev"


def test_units_cover_the_gpu_host_and_the_control_host_with_one_beat():
    commands = sorted(_gpuq_subcommand(unit["Service"]["ExecStart"])
                      for unit in _services().values())
    assert commands == ["beat", "control-worker", "dashboard", "flower", "worker"]


@pytest.mark.parametrize("name", sorted(p.name for p in SYSTEMD.glob("*.service")))
def test_unit_restarts_with_backoff_and_fails_on_a_crash_loop(name):
    unit = _services()[name]
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert float(service["RestartSec"]) >= 1
    assert int(unit["Unit"]["StartLimitBurst"]) >= 1
    assert int(unit["Unit"]["StartLimitIntervalSec"]) > (
        int(unit["Unit"]["StartLimitBurst"]) * float(service["RestartSec"])), \
        "the interval must be able to hold a burst of restarts, or the limit never trips"
    assert service["EnvironmentFile"] == "/etc/gpuq/gpuq.env"
    assert service["User"] not in ("", "root")
    assert service["KillMode"] == "mixed"
    assert float(service["TimeoutStopSec"]) > Settings(_env_file=None).kill_grace_s


def test_units_pass_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        if IN_CI:
            pytest.fail("systemd-analyze is missing (apt-get install systemd)")
        missing("systemd-analyze is not installed here")
    # verify checks that ExecStart exists: point it at this checkout's gpuq.
    for path in [*SYSTEMD.glob("*.service"), *SYSTEMD.glob("*.target")]:
        (tmp_path / path.name).write_text(
            path.read_text().replace("/opt/gpuq/venv/bin/gpuq", GPUQ))
    units = sorted(str(p) for p in tmp_path.iterdir())
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    # verify exits 0 on unknown keys and bad values: any line it prints is a finding.
    findings = [line for line in (result.stdout + result.stderr).splitlines()
                if str(tmp_path) in line or ".service" in line or ".target" in line]
    assert result.returncode == 0 and findings == [], result.stdout + result.stderr
