"""The universal runner as a backend would start it: payload inline, in a file, by array
index; results (a JSON status beside the pickled value) for function calls; exit codes for
commands; SIGTERM."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time

import cloudpickle
import pytest

from adapters.runner import FORWARDED, rank_from_environment
from app.core import results
from app.core.durations import SIGNALS
from tests.support.servers import ROOT, until


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUQ_")
           and k not in ("SLURM_ARRAY_TASK_ID", "AWS_BATCH_JOB_ARRAY_INDEX",
                         "JOB_COMPLETION_INDEX")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "adapters.runner", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def _inline(spec: dict) -> str:
    return base64.b64encode(cloudpickle.dumps(spec)).decode()


@pytest.mark.parametrize(("env", "rank"), [
    ({"GPUQ_JOB_RANK": "3"}, 3),
    ({"SLURM_ARRAY_TASK_ID": "4"}, 4),
    ({"AWS_BATCH_JOB_ARRAY_INDEX": "2", "GPUQ_RANK_OFFSET": "10000"}, 10002),
    ({"JOB_COMPLETION_INDEX": "7"}, 7),
    ({}, 0),
])
def test_rank_comes_from_gpuq_or_the_backend_array_index(env, rank):
    assert rank_from_environment(env) == rank


def test_function_payload_inline_writes_a_json_status_beside_the_pickled_value(tmp_path):
    call = cloudpickle.dumps({"fn": pow, "args": (2,), "kwargs": {}})
    items = [cloudpickle.dumps(n) for n in (5, 6, 7)]
    env = _env(GPUQ_PAYLOAD=_inline({"call": call, "items": items}),
               AWS_BATCH_JOB_ARRAY_INDEX="1", GPUQ_RESULT_DIR=str(tmp_path))
    assert _run(env).returncode == 0
    status, pickled = results.split((tmp_path / "1.pkl").read_bytes())
    assert status.ok and cloudpickle.loads(pickled) == 36


def test_failing_call_writes_an_error_status_with_its_traceback(tmp_path):
    call = cloudpickle.dumps({"fn": int, "args": ("not a number",), "kwargs": {}})
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(cloudpickle.dumps({"call": call}))
    result = _run(_env(), "--payload-file", str(payload), "--result-file",
                  str(tmp_path / "r.pkl"))
    assert result.returncode == 1
    status, pickled = results.split((tmp_path / "r.pkl").read_bytes())
    assert not status.ok
    assert status.type == "builtins.ValueError" and "invalid literal" in status.message
    assert "Traceback" in status.traceback
    assert isinstance(cloudpickle.loads(pickled), ValueError)


def test_command_payload_runs_per_rank_and_keeps_its_exit_code(tmp_path):
    spec = {"command": f"echo rank {{rank}} of {{num_jobs}} > {tmp_path}/out; exit 3",
            "rank_args": None}
    env = _env(GPUQ_PAYLOAD=_inline(spec), SLURM_ARRAY_TASK_ID="2", GPUQ_NUM_JOBS="5")
    assert _run(env).returncode == 3
    assert (tmp_path / "out").read_text().strip() == "rank 2 of 5"


def test_sigterm_stops_the_command_and_exits_143(tmp_path):
    spec = {"command": f"echo started > {tmp_path}/started; sleep 60", "rank_args": None}
    proc = subprocess.Popen([sys.executable, "-m", "adapters.runner"],
                            env=_env(GPUQ_PAYLOAD=_inline(spec)))
    until(lambda: (tmp_path / "started").exists())
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143


def test_a_warning_signal_reaches_the_commands_group_and_it_goes_on(tmp_path):
    # (Slurm's --signal=B:USR2@90 signals the batch shell, which is the runner)
    spec = {"command": f"trap 'echo got-usr2 >> {tmp_path}/seen' USR2; "
                       f"echo started > {tmp_path}/started; "
                       f"while [ ! -s {tmp_path}/seen ]; do sleep 0.1; done; exit 7",
            "rank_args": None}
    proc = subprocess.Popen([sys.executable, "-m", "adapters.runner"],
                            env=_env(GPUQ_PAYLOAD=_inline(spec)))
    until(lambda: (tmp_path / "started").exists())
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=30) == 7, "the job caught it, went on and ended as it chose"
    assert (tmp_path / "seen").read_text() == "got-usr2\n"


def test_the_runner_passes_on_every_signal_a_job_may_ask_for():
    assert {signal.Signals(s).name.removeprefix("SIG") for s in FORWARDED} == set(SIGNALS)


def test_no_payload_names_the_ways_to_give_one():
    result = _run(_env())
    assert result.returncode != 0
    assert "GPUQ_PAYLOAD" in result.stderr


def test_the_runner_loads_only_the_standard_library_and_cloudpickle():
    # Given a command job's payload, run the way every batch replica runs it
    probe = ("import runpy, sys; sys.argv = ['runner']; "
             "code = 0\n"
             "try:\n    runpy.run_module('adapters.runner', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'celery', 'kombu', "
             "'sqlalchemy', 'sqlmodel', 'honcho', 'redis', 'pydantic', 'app', 'scheduler'})\n"
             "print('loaded:', ','.join(heavy), 'exit:', code)")
    env = _env(GPUQ_PAYLOAD=_inline({"command": "true"}), GPUQ_JOB_RANK="0")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          text=True, timeout=60)
    # Then it ran the command, and nothing of Celery, the database or gpuq's server was loaded
    assert done.stdout.strip() == "loaded:  exit: 0", done.stdout + done.stderr
