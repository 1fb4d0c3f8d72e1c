"""gpuq's processes are non-dumpable: a job that runs as the stack's own OS account (a
named user added with --same-account, or any job of a stack not run by root) cannot read
their environment, which holds the database's and Redis's passwords and GPUQ_SECRET."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.servers import ROOT, missing

# A process of the other account that makes itself non-dumpable (or not), says its pid and
# waits; its environment holds a secret.
PROBE = ("import os, sys, time; sys.path.insert(0, {root!r}); "
         "from app.core.procgroup import undumpable; "
         "assert undumpable() if sys.argv[1] == 'hidden' else True; "
         "print(os.getpid(), flush=True); time.sleep(60)")
SYSTEM_PYTHON = Path("/usr/bin/python3")  # the venv's may sit where the other account can't


@pytest.mark.parametrize("hidden", [True, False], ids=["undumpable", "plain"])
def test_a_process_of_the_same_account_cannot_read_an_undumpable_ones_environment(
        other_user: str, hidden: bool):
    runuser = shutil.which("runuser")
    if not SYSTEM_PYTHON.exists() or runuser is None:
        missing("runuser and /usr/bin/python3 act as the other account")
    process = subprocess.Popen(
        [runuser, "-u", other_user, "--", str(SYSTEM_PYTHON), "-c", PROBE.format(root=str(ROOT)),
         "hidden" if hidden else "plain"], stdout=subprocess.PIPE, text=True,
        env={"PATH": "/usr/bin:/bin", "GPUQ_SECRET": "sealed-by-gpuq"})
    pid = 0
    try:
        assert process.stdout is not None
        pid = int(process.stdout.readline())
        # When another process of the same account reads its environment
        read = subprocess.run([runuser, "-u", other_user, "--", "cat", f"/proc/{pid}/environ"],
                              capture_output=True, timeout=30)
        # Then it is refused when the process made itself non-dumpable, and read when not
        if hidden:
            assert read.returncode != 0 and b"sealed-by-gpuq" not in read.stdout
        else:
            assert b"GPUQ_SECRET=sealed-by-gpuq" in read.stdout, read.stderr
    finally:
        for running in (pid, process.pid):  # the probe, then runuser above it
            with contextlib.suppress(ProcessLookupError):
                if running:
                    os.kill(running, signal.SIGKILL)
        process.communicate()
