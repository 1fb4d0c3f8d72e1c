"""Every Python and shell example of the README runs as written against a running stack.

A block preceded by `<!-- not run: REASON -->` (setting up, or starting the stack that the
other blocks use) is skipped, with its reason; every other block must exit 0. The blocks run
in README order, in the directory the stack was started from, as a reader would type them:
`gpuq` on PATH, GPUQ_* variables naming the stack, and stand-ins for the reader's own
train.py, shard.py and eval.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.core.settings import Settings
from tests.support.servers import ROOT, Stack, processes_with, server_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

README = ROOT / "README.md"
LANGUAGES = {"python": "python", "bash": "shell", "sh": "shell", "console": "shell"}
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->")
# The facade example starts GPU workers of its own: under a host name of their own, so that
# they never take the test stack's queues.
EXAMPLE_HOST = "readme-example"
# The reader's scripts: each prints its arguments and its place in the launch.
STAND_IN = ("import os, sys; print(sys.argv[0], *sys.argv[1:], "
            "'rank', os.environ.get('GPUQ_JOB_RANK'), 'of', os.environ.get('GPUQ_NUM_JOBS'))\n")


@dataclass
class Block:
    line: int  # of the opening fence
    kind: str  # python or shell
    code: str
    not_run: str | None  # why it is not run, from the comment before it


def readme_blocks(text: str) -> list[Block]:
    """The fenced Python and shell blocks of `text`, with their not-run comments."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        kind = LANGUAGES.get(opening.group(1))
        if kind is not None:
            code = lines[i + 1:end]
            if opening.group(1) == "console":  # commands are the lines after a prompt
                code = [line[2:] for line in code if line.startswith("$ ")]
            before = next((line for line in reversed(lines[:i]) if line.strip()), "")
            reason = NOT_RUN.search(before)
            blocks.append(Block(i + 1, kind, "\n".join(code) + "\n",
                                reason.group(1) if reason else None))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def test_the_readme_has_examples_of_both_kinds_and_runs_most_of_them():
    assert {b.kind for b in BLOCKS} == {"python", "shell"}
    skipped = [b for b in BLOCKS if b.not_run]
    assert 0 < len(skipped) < len(BLOCKS) / 2, [b.line for b in skipped]


def test_only_blocks_marked_not_run_are_skipped_and_console_runs_its_prompts():
    text = ("intro\n\n<!-- not run: starts the stack -->\n```sh\ngpuq up\n```\n\n"
            "```console\n$ gpuq status\nGPU 0 free\n```\n```json\n{}\n```\n"
            "```python\nprint(1)\n```\n")
    blocks = readme_blocks(text)
    assert [(b.kind, b.code, b.not_run) for b in blocks] == [
        ("shell", "gpuq up\n", "starts the stack"),
        ("shell", "gpuq status\n", None),
        ("python", "print(1)\n", None)]


@pytest.fixture(scope="module")
def workdir(stack: Stack, stack_settings: Settings) -> Iterator[Path]:
    """The directory `gpuq up` ran in (the stack's own), with the reader's scripts in it."""
    for script in ("train.py", "shard.py", "eval.py"):
        (stack_settings.home / script).write_text(STAND_IN)
    yield stack_settings.home
    for pid in processes_with(f"@{EXAMPLE_HOST}"):  # what a failed facade example left
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("block", [
    pytest.param(b, id=f"line-{b.line}-{b.kind}",
                 marks=[pytest.mark.skip(reason=f"not run: {b.not_run}")] if b.not_run else [])
    for b in BLOCKS])
def test_readme_example_runs_as_written(block: Block, workdir: Path, stack_settings: Settings):
    env = server_env(stack_settings, GPUQ_HOSTNAME=EXAMPLE_HOST)  # gpuq and python on PATH
    if block.kind == "python":
        argv = [sys.executable, "-c", block.code]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, (
        f"README line {block.line} exited {done.returncode}\n--- stdout\n{done.stdout}"
        f"\n--- stderr\n{done.stderr}")
