"""Database tables: jobs, their events, launches, named users, their limits and weights,
the lines of jobs files, the record of every attempt, and each user's and project's
decayed GPU use. Times are UTC epoch seconds."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, literal, text
from sqlmodel import Field, SQLModel

from app.core.states import JobState


class Launch(SQLModel, table=True):
    __tablename__ = "launches"
    # Ids are never reused (on SQLite too): a pruned launch's id names nothing again.
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    name: str | None = None
    num_jobs: int
    command: str
    created_at: float
    payload_key: str | None = None
    owner: str = Field(default="", sa_column_kwargs={"server_default": ""})
    project: str = Field(default="", sa_column_kwargs={"server_default": ""})


class Job(SQLModel, table=True):
    __tablename__ = "jobs"
    __table_args__ = (
        # Reads by state, newest first (`gpuq queue --status`, counts, the reconciler);
        # the dispatcher and the jobs waiting for others have partial indexes below.
        Index("ix_jobs_state", "state", "id"),
        Index("ix_jobs_ended", "ended_at"),  # finished jobs pruned by age
        Index("ix_jobs_launch_rank", "launch_id", "rank"),
        Index("ix_jobs_launch_state", "launch_id", "state"),
        Index("ix_jobs_owner", "owner", "id"),  # a named user's own jobs, newest first
        # A user's or a project's PENDING jobs, counted against its pending limit.
        Index("ix_jobs_owner_state", "owner", "state"),
        Index("ix_jobs_project_state", "project", "state"),
        # Ids are never reused, on SQLite too (AUTOINCREMENT): a new job never takes a
        # pruned job's id, and with it that job's attempts and log.
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True)
    name: str | None = Field(default=None, index=True)
    launch_id: int | None = Field(default=None, foreign_key="launches.id")
    rank: int = 0
    num_jobs: int = 1
    command: str  # for a function job, what it calls; the call itself is in the payload
    kind: str = "command"  # command | function
    payload_key: str | None = None  # the launch's payload in Redis
    env: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    workdir: str | None = None
    venv: str | None = None
    conda_env: str | None = None
    gpus: int = 1
    allowed_gpu_ids: list[int] | None = Field(default=None, sa_column=Column(JSON))
    priority: int = 0
    backend: str = "local"
    backend_id: str | None = None  # the job's id at its batch backend
    dispatched_at: float | None = None  # when it last left PENDING
    preflight: str | None = None
    tmux: bool = False  # run in a detached tmux session (`gpuq attach ID`)
    origin: str | None = None  # the jobs file a job came from (set by its watcher only)
    waiting: bool = False  # PENDING until every job of `after` has SUCCEEDED
    max_restarts: int = 0
    time_limit_s: int | None = None  # each attempt's limit from its start; None: none
    signal: str | None = None  # SIG@SECONDS before the limit (app/core/durations.py)
    # When a PENDING job is expected to start (epoch seconds), and on what the planner
    # based it (app/core/states.py EtaBasis): written by the dispatch pass that reaches it.
    eta: float | None = None
    eta_basis: str | None = None
    recover_exit_codes: list[int] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    content_hash: str | None = Field(default=None, index=True)
    state: str = Field(default=JobState.PENDING.value)
    reason: str | None = None
    host: str | None = None
    gpu_ids: list[int] | None = Field(default=None, sa_column=Column(JSON))
    attempt: int = 0
    restart_count: int = 0
    exit_code: int | None = None
    pid: int | None = None
    pid_identity: str | None = None  # boot id and start time of `pid`: recovery checks it
    lease_until: float | None = None  # the attempt's worker holds it until then (renewed)
    not_before: float | None = None  # a restart waits until then (backoff)
    submitted_at: float
    started_at: float | None = None
    ended_at: float | None = None
    runtime_s: float = 0.0
    # Who submitted it (app/core/identity.py): the stack's owner or a named user.
    owner: str = Field(default="", sa_column_kwargs={"server_default": ""})
    # Whose GPU time it is (limits, fair share, accounting): the submitter's --project, else
    # the owner's default project (app/store/limits.py).
    project: str = Field(default="", sa_column_kwargs={"server_default": ""})


# The dispatcher's candidates: PENDING local jobs that wait for nothing. GPU jobs highest
# priority first, then by owner and project, then oldest: a pass finds the (owner, project)
# groups of the highest priority in one seek each and reads each group's head (fair share
# merges the heads), then the next priority's. 0-GPU jobs highest priority first, then
# oldest. Each index in
# exactly the order the dispatcher reads, so that a pass reads its first rows without
# sorting, at any queue depth. Their conditions are written out in the dispatcher's query
# as literals (scheduler/planner/candidates.py): a planner uses a partial index only for a
# query whose conditions it can see imply the index's.
def fixed(value: Any) -> Any:
    """A constant written into a query's SQL, not bound: a planner matches a partial index
    (below) only against conditions whose values it can see."""
    return literal(value, literal_execute=True)


PENDING_GPU_INDEX = "ix_jobs_pending_gpu_by_owner"
PENDING_CPU_INDEX = "ix_jobs_pending_cpu"


def candidate_condition(gpus: str, dialect: str) -> str:
    """The condition of a candidate index, as each database's planner must see it."""
    waiting = "waiting = 0" if dialect == "sqlite" else "waiting = false"
    return f"state = 'PENDING' AND {waiting} AND backend = 'local' AND {gpus}"


CANDIDATE_INDEXES = ((PENDING_GPU_INDEX, "gpus > 0"), (PENDING_CPU_INDEX, "gpus = 0"))

# The GPUs that local jobs hold (STARTING, RUNNING, CANCELLING), read by every pass: a few
# rows among millions, found through an index of just those rows.
HOLDING_INDEX = "ix_jobs_holding"
HOLDING_STATES = ("STARTING", "RUNNING", "CANCELLING")
HOLDING_CONDITION = ("state IN ('STARTING', 'RUNNING', 'CANCELLING') AND backend = 'local' "
                     "AND gpus > 0")
_jobs = Job.__table__.c  # type: ignore[attr-defined]
for _name, _gpus in CANDIDATE_INDEXES:
    # The equality columns lead, though the condition fixes them: SQLite's planner then
    # sees this index serve the query's every equality and its order, and prefers it.
    _groups = (_jobs.owner, _jobs.project) if _name == PENDING_GPU_INDEX else ()
    Index(_name, _jobs.state, _jobs.waiting, _jobs.backend, _jobs.priority.desc(), *_groups,
          _jobs.id, sqlite_where=text(candidate_condition(_gpus, "sqlite")),
          postgresql_where=text(candidate_condition(_gpus, "postgresql")))
Index(HOLDING_INDEX, _jobs.host, sqlite_where=text(HOLDING_CONDITION),
      postgresql_where=text(HOLDING_CONDITION))

# The PENDING jobs of batch backends, which each backend's sync reads up to its room.
BATCH_PENDING_INDEX = "ix_jobs_pending_batch"
BATCH_PENDING_CONDITION = "state = 'PENDING' AND backend <> 'local'"
Index(BATCH_PENDING_INDEX, _jobs.backend, _jobs.id,
      sqlite_where=text(BATCH_PENDING_CONDITION), postgresql_where=text(BATCH_PENDING_CONDITION))

# PENDING jobs waiting for others to end, which the reconciler looks over: few among many.
WAITING_INDEX = "ix_jobs_waiting"


def waiting_condition(dialect: str) -> str:
    return "state = 'PENDING' AND " + ("waiting = 1" if dialect == "sqlite" else "waiting")


Index(WAITING_INDEX, _jobs.id, sqlite_where=text(waiting_condition("sqlite")),
      postgresql_where=text(waiting_condition("postgresql")))


class FileLine(SQLModel, table=True):
    """A line of a jobs file that was submitted, and the job it made (app/store/file_jobs.py):
    kept while the line is in the file, whatever retention prunes, so that a line is
    submitted once. `line_key` is the line's identity (its job's content hash and name)."""

    __tablename__ = "jobs_file_lines"

    origin: str = Field(primary_key=True)  # the jobs file's path
    line_key: str = Field(primary_key=True)
    job_id: int  # no foreign key: the job may be pruned, the line stays known
    stored_at: float


class Payload(SQLModel, table=True):
    """A stored payload (claim check), durable; Redis keeps a cache of it."""

    __tablename__ = "payloads"

    key: str = Field(primary_key=True)
    data: bytes
    created_at: float


class JobCount(SQLModel, table=True):
    """How many jobs of a launch (0: jobs outside any launch) and an owner are in a state,
    summed over slots: kept in the transaction of every change (app/store/counts.py), so that totals
    are read in a few rows at any depth. A writer adds to its own slot, so that concurrent
    writers of one launch and state seldom wait on one row."""

    __tablename__ = "job_counts"

    launch_id: int = Field(primary_key=True)
    owner: str = Field(primary_key=True)  # /metrics reads each user's jobs per state
    state: str = Field(primary_key=True)
    slot: int = Field(primary_key=True)
    n: int = Field(sa_type=BigInteger)


class JobDependency(SQLModel, table=True):
    """Job `job_id` may start only once job `after_id` has SUCCEEDED."""

    __tablename__ = "job_dependencies"

    job_id: int = Field(foreign_key="jobs.id", primary_key=True)
    after_id: int = Field(foreign_key="jobs.id", primary_key=True, index=True)


class JobEvent(SQLModel, table=True):
    __tablename__ = "job_events"

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="jobs.id", index=True)
    at: float
    from_state: str | None
    to_state: str
    reason: str | None = None


def event_row(job_id: int, at: float, source: str | None, target: str, reason: str | None
              ) -> dict[str, Any]:
    return {"job_id": job_id, "at": at, "from_state": source, "to_state": target,
            "reason": reason}


class User(SQLModel, table=True):
    """A named gpuq user, who shows a token (app/store/users.py). Only the token's SHA-256 is
    kept: the token itself is printed once, when the user is added or their token rotated."""

    __tablename__ = "users"

    name: str = Field(primary_key=True)
    token_hash: str = Field(unique=True)
    admin: bool = False
    created_at: float
    revoked_at: float | None = None
    os_user: str | None = None  # the OS account their jobs run as (a stack run by root)
    same_account: bool = False  # their jobs run as the stack's own account, by choice
    expires_at: float | None = None  # epoch after which their token names no one
    last_used_at: float | None = None  # last request with their token (to the minute)


class Limit(SQLModel, table=True):
    """An admin's limits and fair-share weight for one user or one project (`gpuq limits`);
    the name `*` holds the default of every user (or project) without a row of its own."""

    __tablename__ = "limits"

    kind: str = Field(primary_key=True)  # user | project
    name: str = Field(primary_key=True)
    max_gpus: int | None = None  # GPUs its jobs may hold at once
    max_pending: int | None = None  # jobs it may have PENDING
    max_cpu_jobs: int | None = None  # 0-GPU jobs it may run at once
    weight: float | None = None  # fair share: twice the weight, twice the GPU time
    default_project: str | None = None  # a user's jobs' project when they name none
    max_priority: int | None = None  # the highest priority its jobs may be submitted at
    max_time_s: int | None = None  # the longest time limit its jobs may ask for
    default_time_s: int | None = None  # the time limit of its jobs that give none


class ProjectMember(SQLModel, table=True):
    """A named user an admin let submit to a project (`gpuq project members`): a project
    exists while it has members."""

    __tablename__ = "project_members"

    name: str = Field(primary_key=True)  # the project
    member: str = Field(primary_key=True)  # a user's name


class Attempt(SQLModel, table=True):
    """One attempt of a job, written when it ended (app/store/accounting.py): what a report
    adds up. Kept apart from the jobs, whose rows are pruned."""

    __tablename__ = "attempts"
    __table_args__ = (
        Index("ix_attempts_ended", "ended_at"),
        Index("ix_attempts_job", "job_id", "attempt"),
    )

    id: int | None = Field(default=None, primary_key=True)
    job_id: int
    attempt: int
    owner: str
    project: str
    launch_id: int | None = None
    backend: str
    host: str | None = None
    gpu_ids: list[int] | None = Field(default=None, sa_column=Column(JSON))
    gpus: int
    started_at: float | None = None  # None: it never ran (cancelled or lost while STARTING)
    ended_at: float
    gpu_seconds: float  # GPUs x seconds from started_at to ended_at
    outcome: str  # the state it ended in (RECOVERING or PENDING: it is to run again)
    wait_s: float | None = None  # first attempts: from submission to start
    peak_memory_mb: int | None = None  # from the GPU monitor's readings of its GPUs
    mean_utilization_pct: float | None = None
    cpu_s: float | None = None  # from the container it ran in (scheduler/worker/containment.py)
    peak_host_memory_mb: int | None = None


class Usage(SQLModel, table=True):
    """A user's or a project's GPU-seconds of ended attempts, decayed to `at` with the
    fair-share half-life: what fair share ranks by."""

    __tablename__ = "usage"

    kind: str = Field(primary_key=True)  # user | project
    name: str = Field(primary_key=True)
    gpu_seconds: float
    at: float
