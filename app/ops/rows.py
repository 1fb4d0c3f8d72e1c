"""The rows every read operation returns, declared once: the operations build them, the
CLI and the client read them, and the dashboard's API uses them as its response models.

Both transports carry a row's JSON form (`dump()`), so that a local and a remote call give
the same answer. Rows are vocabulary: pydantic and app/core only, never the database's
models (the `of` builders read the attributes of the rows they are given), so that the
HTTP client and the dashboard's schema load no SQLAlchemy.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from app.core.states import TERMINAL, EtaBasis, JobState

if TYPE_CHECKING:
    from app.store.models import Job, JobEvent, Launch

# The states in which a job's attempt runs against its time limit.
_TIMED = ("RUNNING", "CANCELLING")
# The most rows one page of the queue carries.
MAX_PAGE = 10_000


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


class Row(BaseModel):
    def dump(self) -> dict[str, Any]:
        """The JSON form both transports carry."""
        return self.model_dump(mode="json", by_alias=True)


class JobRow(Row):
    id: int
    name: str | None
    launch_id: int | None
    rank: int
    num_jobs: int
    status: str
    reason: str | None
    command: str
    exit_code: int | None
    gpus: int
    gpu_ids: list[int] | None
    host: str | None
    priority: int
    backend: str
    backend_id: str | None
    submitted_at: str | None
    started_at: str | None
    ended_at: str | None
    restart_count: int
    duration_s: float | None
    owner: str = Field("", description="Who submitted it: the stack's owner or a named user.")
    project: str = Field("", description="Whose GPU time it is (limits, fair share).")
    why: str | None = Field(None, description="Why a PENDING job waits, as a code (`gpuq "
                            "why`).")
    why_reason: str | None = Field(None, description="The same, in a sentence.")
    time_limit_s: int | None = Field(None, description="Each attempt's time limit from its "
                                     "start (--time); None: none.")
    signal: str | None = Field(None, description="SIG@SECONDS sent before the time limit.")
    deadline: str | None = Field(None, description="When a running attempt reaches its time "
                                 "limit.")
    eta: str | None = Field(None, description="When a PENDING job is expected to start, as "
                            "the last dispatch pass that reached it planned; None: unknown.")
    eta_basis: str | None = Field(None, description="What `eta` rests on: reservation, "
                                  "limits, siblings or unknown (PENDING jobs only).")

    @classmethod
    def of(cls, job: Job, now: float | None = None,
           waits: tuple[str, str] | None = None) -> JobRow:
        end = job.ended_at or (now if job.started_at else None)
        return cls(
            id=job.id or 0, name=job.name, launch_id=job.launch_id, rank=job.rank,
            num_jobs=job.num_jobs, status=job.state, reason=job.reason,
            why=waits[0] if waits else None, why_reason=waits[1] if waits else None,
            project=job.project, command=job.command,
            exit_code=job.exit_code, gpus=job.gpus, gpu_ids=job.gpu_ids, host=job.host,
            priority=job.priority, backend=job.backend, backend_id=job.backend_id,
            submitted_at=iso(job.submitted_at), started_at=iso(job.started_at),
            ended_at=iso(job.ended_at), restart_count=job.restart_count, owner=job.owner,
            time_limit_s=job.time_limit_s, signal=job.signal,
            deadline=iso(job.started_at + job.time_limit_s)
            if job.time_limit_s and job.started_at and not job.ended_at
            and job.state in _TIMED else None,
            eta=iso(job.eta) if job.state == JobState.PENDING else None,
            eta_basis=(job.eta_basis or EtaBasis.UNKNOWN.value)
            if job.state == JobState.PENDING else None,
            duration_s=round(job.runtime_s + (end - job.started_at), 3)
            if end and job.started_at else (round(job.runtime_s, 3) or None))


class JobPage(Row):
    jobs: list[JobRow]
    total: int = Field(description="Jobs that match the filters, on every page.")
    limit: int
    offset: int


class Event(Row):
    model_config = ConfigDict(populate_by_name=True)

    at: float = Field(description="UTC epoch seconds.")
    from_state: str | None = Field(alias="from")
    to: str
    reason: str | None

    @classmethod
    def of(cls, event: JobEvent) -> Event:
        return cls(at=event.at, from_state=event.from_state, to=event.to_state,
                   reason=event.reason)


class AttemptRow(Row):
    """One ended attempt of a job, from the accounting record."""

    attempt: int
    outcome: str = Field(description="The state it ended in; RECOVERING or PENDING: it runs "
                         "again.")
    host: str | None
    gpu_ids: list[int] | None
    gpus: int
    started_at: str | None = Field(description="None: it never ran.")
    ended_at: str | None
    gpu_seconds: float = Field(description="GPUs x seconds from its start to its end.")
    wait_s: float | None = Field(None, description="First attempts: submission to start.")
    peak_memory_mb: int | None = Field(None, description="Most memory its GPUs held at once.")
    mean_utilization_pct: float | None = Field(None, description="Its GPUs' mean utilisation.")
    cpu_s: float | None = Field(None, description="CPU seconds of everything it started, "
                                "from its cgroup.")
    peak_host_memory_mb: int | None = Field(None, description="Most host memory it held at "
                                            "once, from its cgroup.")

    @classmethod
    def of(cls, record: dict[str, Any]) -> AttemptRow:
        return cls(**{**record, "started_at": iso(record["started_at"]),
                      "ended_at": iso(record["ended_at"])})


class JobDetail(JobRow):
    env: dict[str, str] = Field(description="The job's own variables, secrets masked.")
    pid: int | None
    tmux: bool
    preflight: str | None
    after: list[int] | None = Field(description="Jobs that must SUCCEED before it starts.")
    events: list[Event]
    attempts: list[AttemptRow] = Field([], description="Its ended attempts, first first, "
                                       "with their GPU figures.")

    @classmethod
    def of_job(cls, job: Job, now: float, after: list[int], events: list[JobEvent],
               attempts: list[dict[str, Any]] | None = None) -> JobDetail:
        return cls(**JobRow.of(job, now).model_dump(), env=dict(job.env), pid=job.pid,
                   tmux=job.tmux, preflight=job.preflight, after=after or None,
                   events=[Event.of(e) for e in events],
                   attempts=[AttemptRow.of(a) for a in attempts or []])


class ReportTotals(Row):
    gpu_hours: float
    gpu_seconds: float
    jobs: int
    attempts: int
    success_rate: float | None = Field(description="Of the jobs whose last attempt in the "
                                       "window ended them, the share that SUCCEEDED.")
    mean_wait_s: float | None = Field(description="Submission to first start.")
    mean_utilization_pct: float | None
    peak_memory_mb: int | None


class Report(Row):
    since: str = Field(description="Attempts that ended from then on (UTC).")
    by: str = Field(description="user, project or launch.")
    groups: dict[str, ReportTotals]


class LaunchRow(Row):
    id: int
    name: str | None
    num_jobs: int
    command: str
    counts: dict[str, int] = Field(description="Replicas per state.")
    done: int = Field(description="Replicas in a terminal state.")
    owner: str = Field("", description="Who launched it.")

    @classmethod
    def of(cls, launch: Launch, counts: dict[str, int]) -> LaunchRow:
        return cls(id=launch.id or 0, name=launch.name, num_jobs=launch.num_jobs,
                   command=launch.command, counts=counts, owner=launch.owner,
                   done=sum(n for state, n in counts.items() if state in TERMINAL))


class Launches(Row):
    launches: list[LaunchRow]


class Reading(Row):
    """The monitor's latest reading of one GPU."""

    memory_used_mb: int
    memory_total_mb: int
    utilization_pct: int
    process_count: int = 0
    mig: bool = False
    foreign: bool = Field(False, description="Used by processes outside gpuq.")
    at: float | None = Field(None, description="When it was read, UTC epoch seconds.")


class Gpu(Row):
    index: int
    name: str | None = None
    memory_total_mb: int | None = None
    provider: str | None = None
    alive: bool = Field(description="Its worker's heartbeat is current.")
    job_id: int | None = Field(description="The job holding it.")
    reading: Reading | None


class Host(Row):
    host: str
    gpus: list[Gpu]
    workers_alive: int
    stale: bool = Field(description="Some of its GPU workers stopped sending heartbeats.")


class ProgramExits(Row):
    host: str
    program: str = Field(description="A program of `gpuq up` or `gpuq worker` that exited.")
    exits: int
    exits_in_window: int = Field(description="Exits within the last window_s seconds.")
    window_s: float
    exit_code: int = Field(description="Its last exit code (negative: killed by that signal).")
    last_exit_at: float
    backoff_s: float = Field(description="Wait before its next restart.")
    crash_loop: bool


class LimitEntry(Row):
    kind: str = Field(description="user or project")
    name: str = Field(description="Its name; * is everyone without an entry of their own.")
    max_gpus: int | None = Field(description="GPUs its jobs may hold at once (none: no limit).")
    max_pending: int | None = Field(description="Jobs it may have PENDING (none: no limit).")
    max_cpu_jobs: int | None = Field(
        None, description="0-GPU jobs it may run at once (none: no limit).")
    weight: float = Field(description="Fair-share weight: twice the weight, twice the GPU time.")
    default_project: str | None = Field(description="A user's jobs' project when unnamed.")
    max_priority: int | None = Field(
        None, description="The highest priority its jobs may be submitted at (none: no "
        "limit; a named user's default is 0; admins have none).")
    running_gpus: int = Field(description="GPUs its jobs hold now.")
    pending: int | None = Field(description="Jobs PENDING now (not counted by `status`).")
    usage_gpu_hours: float = Field(description="Fair-share usage: decayed GPU-hours.")


class LimitsTable(Row):
    entries: list[LimitEntry]
    fair_share: bool
    fair_share_by: str
    half_life_days: float
    file: str = Field(description="The limits file read beside the database's entries.")
    open_projects: bool = Field(
        False, description="Every user may submit to any project (GPUQ_OPEN_PROJECTS); "
        "else a named user to their default project or one they are a member of.")


class Why(Row):
    job_id: int
    status: str
    code: str = Field(description="READY, NOT_PENDING, DEPENDENCY, BACKOFF, BATCH, CPU, LIMIT, "
                      "FAIR_SHARE, PRIORITY, EARMARKED, RESOURCES, FOREIGN, WORKER_DOWN, "
                      "NEVER_FITS or DEPTH.")
    reason: str


class Status(Row):
    hosts: list[Host]
    counts: dict[str, int] = Field(description="Jobs per state.")
    stale_workers: list[str] = Field([], description="host/gpuN whose heartbeat stopped.")
    programs: list[ProgramExits] = Field([], description="Supervised programs that exited "
                                         "lately; crash_loop marks those that keep dying.")
    flower: str | None = Field(None, description="Where Flower listens.")
    dashboard: str | None = Field(None, description="Where the dashboard listens.")
    limits: LimitsTable | None = Field(None, description="Limits, weights and GPUs running "
                                       "per user and project.")


class Logs(Row):
    text: str
    offset: int = Field(description="Byte offset to continue from.")
    status: str
    where: str | None = Field(description="Where a batch backend keeps the output instead.")


class CancelResult(Row):
    cancelled: list[int] = Field(description="Jobs that ended CANCELLED now.")
    cancelling: list[int] = Field(description="Running jobs told to stop.")


class Submitted(Row):
    job_ids: list[int]
    launch_id: int | None
