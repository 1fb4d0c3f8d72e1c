"""Jobs that record their own spans, and the invariants checked on them after a fault.

Each run of a span job appends a line to a shared file every tick while it runs:
`job_id attempt run host gpus epoch`, where `attempt` is the job's GPUQ_ATTEMPT and `run`
is unique to that process. A run's span is its first to its last tick (a run killed
mid-tick simply ends at its last one). From the spans:

- no two runs of one job overlapped (a job never ran in two places at once);
- no two runs on one GPU of one host overlapped (no GPU was double-booked);
- no attempt of a job ran twice: one run per (job, attempt), and no attempt beyond the
  job's recorded attempts.
"""

from __future__ import annotations

import shlex
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

TICK_S = 0.2


def span_command(out: Path, seconds: float, exit_code: int = 0) -> str:
    """A job that ticks into `out` for about `seconds`, then exits `exit_code`."""
    ticks = max(1, int(seconds / TICK_S))
    line = (f'echo "$GPUQ_JOB_ID $GPUQ_ATTEMPT $run ${{GPUQ_HOST:-?}} '
            f'${{CUDA_VISIBLE_DEVICES:--}} $(date +%s.%N)" >> {shlex.quote(str(out))}')
    return (f"run=$$.$RANDOM$RANDOM; for i in $(seq {ticks}); do {line}; sleep {TICK_S}; "
            f"done; {line}; exit {exit_code}")


@dataclass
class Span:
    job_id: int
    attempt: int
    run: str
    host: str
    gpus: tuple[str, ...]
    start: float
    end: float


def read_spans(out: Path) -> list[Span]:
    first: dict[tuple[int, str], Span] = {}
    if not out.exists():
        return []
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) != 6:
            continue  # a line cut short by a SIGKILL mid-write
        job, attempt, run, host, gpus, at = parts
        try:
            key, when, number = (int(job), run), float(at), int(attempt)
        except ValueError:
            continue
        span = first.get(key)
        if span is None:
            first[key] = Span(int(job), number, run, host,
                              tuple(g for g in gpus.split(",") if g and g != "-"), when, when)
        else:
            span.start, span.end = min(span.start, when), max(span.end, when)
    return list(first.values())


def _overlapping(spans: list[Span]) -> list[tuple[Span, Span]]:
    ordered = sorted(spans, key=lambda s: s.start)
    found = []
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            if b.start > a.end:
                break
            found.append((a, b))
    return found


@dataclass
class Violations:
    ran_twice_at_once: list[tuple[Span, Span]] = field(default_factory=list)
    gpu_overlaps: list[tuple[Span, Span]] = field(default_factory=list)
    runs_over_attempts: dict[int, tuple[int, int]] = field(default_factory=dict)
    attempts_run_twice: dict[tuple[int, int], int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.ran_twice_at_once or self.gpu_overlaps or self.runs_over_attempts
                    or self.attempts_run_twice)

    def __str__(self) -> str:
        return (f"runs of one job at once: {self.ran_twice_at_once[:3]}; "
                f"GPU overlaps: {self.gpu_overlaps[:3]}; "
                f"(job, attempt) run more than once: "
                f"{dict(list(self.attempts_run_twice.items())[:5])}; "
                f"more runs than attempts (job: runs, attempts): "
                f"{dict(list(self.runs_over_attempts.items())[:5])}")


def check(spans: list[Span], attempts: dict[int, int]) -> Violations:
    """The invariants over `spans`; `attempts` maps job id to its attempts so far."""
    found = Violations()
    by_job: dict[int, list[Span]] = defaultdict(list)
    by_gpu: dict[tuple[str, str], list[Span]] = defaultdict(list)
    for span in spans:
        by_job[span.job_id].append(span)
        for gpu in span.gpus:
            by_gpu[(span.host, gpu)].append(span)
    for job_id, runs in by_job.items():
        found.ran_twice_at_once += _overlapping(runs)
        if max(run.attempt for run in runs) > attempts.get(job_id, 0):
            found.runs_over_attempts[job_id] = (len(runs), attempts.get(job_id, 0))
        per_attempt = Counter(run.attempt for run in runs)
        found.attempts_run_twice.update({(job_id, a): n for a, n in per_attempt.items()
                                         if n > 1})
    for runs in by_gpu.values():
        found.gpu_overlaps += _overlapping(runs)
    return found
