"""Start-up of what runs once per command or per replica, each a fresh process, median of 5:
the batch runner (`python -m adapters.runner` running `true`), `gpuq --help`, and
`gpuq queue --json` (the first 50 of 10,000 stored jobs), with the modules each loads.

Baseline, same run: the same commands from the code before the re-cut (commit 11228aa,
taken out of this repository's history into a temporary directory), on the same venv and
Redis, its 10,000 jobs stored in a database of its own (it reads no later revision).
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cloudpickle

from bench.harness import ROOT, bench_stack, median_time, report

BEFORE = "11228aa"
JOBS = 10_000
HEAVY = ("celery", "kombu", "sqlalchemy", "sqlmodel", "honcho")
# How each tree's CLI is entered: its console script's target.
CLI_ENTRY = {"now": "from app.cli.main import main", "before": "from app.cli import main"}


@contextmanager
def tree_before(commit: str = BEFORE) -> Iterator[Path]:
    """The source tree at `commit`, from git."""
    where = Path(tempfile.mkdtemp(prefix="gpuq-before-"))
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _cli(tree: str, *args: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.argv = ['gpuq', *{list(args)!r}]; "
            f"{CLI_ENTRY[tree]}; main()"]


def _loaded(argv: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """How many modules a command imports, and which of the heavy ones."""
    done = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=env,
                          cwd=env["PYTHONPATH"], capture_output=True, text=True)
    names = [line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
             if line.startswith("import time:") and "|" in line][1:]
    return len(names), sorted({n.split(".")[0] for n in names} & set(HEAVY))


def _timed(argv: list[str], env: dict[str, str]) -> float:
    # Run from the tree itself: `python -c` puts the working directory first on sys.path.
    return median_time(lambda: subprocess.run(argv, env=env, cwd=env.get("PYTHONPATH"),
                                              check=True, stdout=subprocess.DEVNULL), runs=5)


def main() -> None:
    payload = base64.b64encode(cloudpickle.dumps({"command": "true"})).decode()
    with bench_stack() as bench, tree_before() as before:
        bench.client.launch("true", num_jobs=JOBS)
        trees = {"now": str(ROOT), "before": str(before)}
        # The code before reads no database a later revision made: its jobs are stored, as
        # many, in a database of its own that it makes itself.
        before_home = bench.settings.home / "before"
        subprocess.run([sys.executable, "-c", "from app.client import Client; "
                        f"Client().launch('true', num_jobs={JOBS})"], check=True,
                       env=bench.env(PYTHONPATH=str(before), GPUQ_HOME=str(before_home)),
                       cwd=before, stdout=subprocess.DEVNULL)
        homes = {"now": str(bench.settings.home), "before": str(before_home)}
        figures: dict[str, dict[str, tuple[float, int, list[str]]]] = {}
        for tree, path in trees.items():
            env = bench.env(PYTHONPATH=path, GPUQ_HOME=homes[tree])
            runner_env = {**env, "GPUQ_PAYLOAD": payload, "GPUQ_JOB_RANK": "0"}
            commands = {"runner": ([sys.executable, "-m", "adapters.runner"], runner_env),
                        "help": (_cli(tree, "--help"), env),
                        "queue": (_cli(tree, "queue", "--json"), env)}
            figures[tree] = {name: (_timed(argv, e), *_loaded(argv, e))
                             for name, (argv, e) in commands.items()}
    bare = _timed([sys.executable, "-c", "pass"], {})
    targets = {"runner": 0.2, "help": 0.3, "queue": 0.35}
    for name, title in (("runner", "batch runner start"), ("help", "`gpuq --help`"),
                        ("queue", "`gpuq queue`, first 50 of 10,000")):
        now_s, now_n, now_heavy = figures["now"][name]
        old_s, old_n, old_heavy = figures["before"][name]
        report(title,
               f"{now_s:.3f} s, {now_n} modules, heavy: {', '.join(now_heavy) or 'none'}",
               f"<= {targets[name]} s", f"before the re-cut {old_s:.3f} s, {old_n} modules, "
               f"heavy: {', '.join(old_heavy) or 'none'}; bare interpreter {bare:.3f} s",
               old_s / now_s, now_s <= targets[name])


if __name__ == "__main__":
    main()
