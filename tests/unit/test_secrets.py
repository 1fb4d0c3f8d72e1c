"""Secret variables: sealed before they travel, passed by name or from a private file, and
a job's environment built from an allow-list on every backend."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest

from app.client import Client
from app.core import sealing
from app.core.errors import InvalidJobSpec, PayloadNotAuthentic
from app.core.job_env import JOB_VARIABLES, job_environment
from app.core.paths import JobPaths
from app.store.models import Job
from scheduler.worker import tmux
from scheduler.worker.executor import job_environment as replica_environment
from tests.support.servers import missing, server_env

GPUQ = str(Path(sys.executable).parent / "gpuq")


# -- sealing -------------------------------------------------------------------------------

def test_sealed_secrets_open_only_with_the_same_key():
    sealed = sealing.seal({"API_TOKEN": "hunter2-value"}, "shared secret")
    assert b"hunter2-value" not in sealed and b"API_TOKEN" not in sealed
    assert sealing.unseal(sealed, "shared secret") == {"API_TOKEN": "hunter2-value"}
    with pytest.raises(PayloadNotAuthentic, match="same GPUQ_SECRET"):
        sealing.unseal(sealed, "another secret")


def test_a_changed_byte_of_sealed_secrets_is_refused():
    sealed = bytearray(sealing.seal({"A": "b"}, "k"))
    sealed[-1] ^= 1
    with pytest.raises(PayloadNotAuthentic):
        sealing.unseal(bytes(sealed), "k")


def test_the_stacks_own_key_is_made_once_and_private(tmp_path: Path):
    assert sealing.local_key(tmp_path, create=False) is None
    first = sealing.local_key(tmp_path, create=True)
    assert first and sealing.local_key(tmp_path, create=True) == first
    mode = stat.S_IMODE((tmp_path / sealing.LOCAL_KEY_FILE).stat().st_mode)
    assert mode == 0o600
    assert sealing.key_material("given", tmp_path) == "given", "GPUQ_SECRET comes first"


def test_the_client_seals_the_payloads_secrets(local: Client):
    entry = local._secrets({"API_TOKEN": "v4lue"})
    assert set(entry) == {"sealed_secrets"} and b"v4lue" not in cloudpickle.dumps(entry)
    assert sealing.payload_secrets(entry, None, local.settings.home) == {"API_TOKEN": "v4lue"}


def test_a_remote_client_without_gpuq_secret_refuses_secrets(settings):
    remote = Client(settings.model_copy(update={"secret": None}), "remote")
    try:
        with pytest.raises(InvalidJobSpec, match="secrets need GPUQ_SECRET"):
            remote.submit("true", secrets={"API_TOKEN": "x"})
    finally:
        remote.close()


# -- the command line ------------------------------------------------------------------------

def _submit(settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GPUQ, "submit", *args, "--", "true"],
                          env=server_env(settings, **env), capture_output=True, text=True,
                          timeout=60)


def test_a_value_in_the_command_line_is_refused_naming_both_ways(settings):
    done = _submit(settings, "--secret", "API_TOKEN=hunter2")
    assert done.returncode == 2
    assert "export it and pass --secret API_TOKEN" in done.stderr
    assert "--secret-file PATH" in done.stderr


def test_a_secret_file_others_may_read_is_refused(settings, tmp_path: Path):
    path = tmp_path / "secrets.env"
    path.write_text("API_TOKEN=hunter2\n")
    path.chmod(0o644)
    done = _submit(settings, "--secret-file", str(path))
    assert done.returncode == 2 and f"chmod 600 {path}" in done.stderr


def test_a_private_secret_file_is_read_line_by_line(tmp_path: Path):
    from app.cli.jobs import _parse_secrets

    path = tmp_path / "secrets.env"
    path.write_text("# tokens\nAPI_TOKEN=a=b c\n\nOTHER=2\n")
    path.chmod(0o600)
    assert _parse_secrets([], [path]) == {"API_TOKEN": "a=b c", "OTHER": "2"}
    path.write_text("no equals sign\n")
    with pytest.raises(Exception, match="line 1 is not NAME=VALUE"):
        _parse_secrets([], [path])


# -- the job's environment -------------------------------------------------------------------

WORKER = {"PATH": "/usr/bin", "HOME": "/home/w", "LC_ALL": "C.UTF-8",
          "GPUQ_SECRET": "signing", "GPUQ_DATABASE_URL": "postgresql://u:pw@db/x",
          "AWS_SECRET_ACCESS_KEY": "aws", "SSH_AUTH_SOCK": "/tmp/agent"}


def test_a_job_inherits_only_the_allow_list():
    env = job_environment({"MINE": "1"}, {"GPUQ_JOB_ID": "7"}, {"TOKEN": "t"}, environ=WORKER)
    assert env == {"PATH": "/usr/bin", "HOME": "/home/w", "LC_ALL": "C.UTF-8", "MINE": "1",
                   "GPUQ_JOB_ID": "7", "TOKEN": "t"}


def test_a_replica_gets_gpuq_variables_but_none_of_its_workers_settings():
    job = Job(id=4, launch_id=None, rank=0, num_jobs=1, command="true", env={"MINE": "1"})
    env = replica_environment(job, WORKER, gpu_ids=[1], host="box", secrets={"TOKEN": "t"})
    assert {k for k in env if k.startswith("GPUQ_")} <= set(JOB_VARIABLES)
    assert not {"AWS_SECRET_ACCESS_KEY", "SSH_AUTH_SOCK"} & set(env)
    assert (env["MINE"], env["TOKEN"], env["CUDA_VISIBLE_DEVICES"]) == ("1", "t", "1")


def test_a_process_backend_job_inherits_no_worker_setting(local: Client, rt, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    from adapters.process import ProcessAdapter
    from tests.contract.test_adapters import drive

    monkeypatch.setenv("GPUQ_DATABASE_URL", "postgresql://u:leaked-password@db/x")
    monkeypatch.setenv("SOME_WORKER_ONLY_VARIABLE", "leaked")
    adapter = ProcessAdapter()
    adapter.rt = rt
    adapter.inline_limit_bytes = 16  # the payload goes in a file the runner reads
    dump = tmp_path / "env.dump"
    job = local.submit(f"env -0 > {dump}", backend="process", secrets={"API_TOKEN": "t0k"})
    assert drive(adapter, local, [job.id])[0]["status"] == "SUCCEEDED"
    (payload,) = (adapter.store_dir(rt.settings) / "payloads").rglob("*")
    assert stat.S_IMODE(payload.stat().st_mode) == 0o600
    assert b"t0k" not in payload.read_bytes()
    env = dict(e.split("=", 1) for e in dump.read_text().split("\0") if e)
    assert env["API_TOKEN"] == "t0k" and "SOME_WORKER_ONLY_VARIABLE" not in env
    assert {k for k in env if k.startswith("GPUQ_")} <= set(JOB_VARIABLES)


# -- attachable jobs ------------------------------------------------------------------------

def test_a_tmux_script_holds_no_value_and_is_gone_when_the_attempt_ends(tmp_path: Path):
    if not os.path.exists("/usr/bin/tmux") and not os.path.exists("/bin/tmux"):
        missing("tmux is not installed")
    paths = JobPaths(tmp_path, 31)
    paths.logs_dir.mkdir(parents=True)
    seen = tmp_path / "seen"
    job = Job(id=31, command="x", tmux=True)
    env = {"PATH": os.environ["PATH"], "API_TOKEN": "pane-s3cret"}
    scripts: list[str] = []

    def started(_pid: int) -> bool:
        scripts.append(paths.tmux_script.read_text())
        return True

    socket = tmp_path / "tmux.sock"
    try:
        outcome = tmux.run(job, f"echo $API_TOKEN > {seen}", env, paths.log, socket=socket,
                           paths=paths, grace_s=1, should_stop=lambda: None, on_start=started)
    finally:
        subprocess.run(["tmux", "-S", str(socket), "kill-server"], capture_output=True)
    assert outcome.exit_code == 0 and seen.read_text() == "pane-s3cret\n"
    assert scripts and "pane-s3cret" not in scripts[0]
    assert not paths.tmux_script.exists() and not tmux.env_fifo(paths).exists()


def test_every_variable_a_job_reads_about_itself_is_one_gpuq_gives_it():
    import re

    import app.client.environment as environment

    read = set(re.findall(r"GPUQ_[A-Z_]+", Path(environment.__file__).read_text()))
    assert read and read <= set(JOB_VARIABLES)
