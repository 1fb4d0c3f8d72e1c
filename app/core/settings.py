"""gpuq's one settings object: every default lives here, each with a description."""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.envvars import DEFAULT_HOME, DEFAULT_OP_TIMEOUT_S, DEFAULT_TOKEN_FILE

SECRET_MASK = "****"
# A worker whose lease runs out stops its job this long, plus the kill grace, before then.
LEASE_SAFETY_S = 2.0


class Settings(BaseSettings):
    """Effective configuration, read from `GPUQ_*` variables and a `.env` file."""

    model_config = SettingsConfigDict(env_prefix="GPUQ_", env_file=".env", extra="ignore")

    home: Path = Field(
        Path(DEFAULT_HOME),
        description="Data directory: database, job logs, embedded Redis state."
    )
    redis_url: str | None = Field(
        None, description="Broker and payload store: redis://, rediss://, or sentinel:// "
        "(sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...][/DB]?master=NAME). Unset: an "
        "embedded server under `home`."
    )
    database_url: str | None = Field(
        None, description="System of record. Unset: SQLite (WAL) under `home`."
    )
    fake_gpus: int | None = Field(
        None, ge=0, description="Pretend this host has N GPUs (also used when NVML is missing)."
    )
    hostname: str = Field(
        default_factory=socket.gethostname,
        description="This host's name in queue names; override to simulate several hosts.",
    )
    transport: str = Field(
        "local", description="How the client runs operations: local (in process), remote "
        "(the control worker, over the broker) or http (a gpuq dashboard at GPUQ_URL, as the "
        "named user whose token it shows; chosen by itself when GPUQ_URL and a token are set). "
        "Unset, the everyday commands of the CLI (queue, status, submit, launches, job, wait) "
        "of the stack's owner go to the stack's dashboard over its socket in GPUQ_HOME while "
        "it runs, which answers sooner than loading gpuq in process; set it to local to keep "
        "them in process."
    )
    url: str | None = Field(
        None, description="A gpuq dashboard's address (http://host:port) that a named user "
        "reaches gpuq through, with their token.")
    token: str | None = Field(
        None, description="A named user's token (`gpuq user add` printed it); else read from "
        "GPUQ_TOKEN_FILE.")
    token_file: Path = Field(
        Path(DEFAULT_TOKEN_FILE), description="A file holding a named user's token; "
        "refused unless only its owner may read it (chmod 600).")
    kill_grace_s: float = Field(
        10.0, gt=0, description="Seconds between SIGTERM and SIGKILL when a job is cancelled "
        "or its worker stops it (shutdown, lease lost)."
    )
    kill_wait_s: float = Field(
        30.0, gt=0, description="Seconds between SIGTERM and SIGKILL when a job reaches its "
        "time limit (--time), to save its work (Slurm's KillWait); it ends TIMEOUT."
    )
    reservation_ttl_s: int = Field(
        60, gt=5, description="An attempt's lease: its worker renews it every heartbeat and "
        "stops the job when it could not for this long, less the kill grace and "
        "LEASE_SAFETY_S; a GPU reservation in Redis expires after as long."
    )
    database_retry_s: float = Field(
        120.0, gt=0, description="How long a worker's database writes (claiming a job, "
        "marking it running: no longer than its lease) retry a database that is away; an "
        "attempt's outcome is retried until it is recorded."
    )
    db_connect_timeout_s: int = Field(
        10, gt=0, description="PostgreSQL: how long opening a connection may take before it "
        "fails (and is retried or reported) instead of hanging on an unreachable server.")
    db_statement_timeout_s: float = Field(
        30.0, ge=0, description="PostgreSQL: the longest one statement may run before the "
        "server cancels it (0: no limit; `gpuq db` migrations have none). SQLite waits up to "
        "30 s for another process's write lock.")
    lease_margin_s: float = Field(
        10.0, ge=0, description="How long after an attempt's lease ran out the reconciler "
        "settles it (covers clock skew between hosts)."
    )
    heartbeat_s: float = Field(
        5.0, gt=0, description="How often workers refresh their liveness and reservations."
    )
    dispatch_scan_limit: int = Field(
        1000, ge=64, description="How many PENDING GPU jobs one dispatch pass examines at "
        "most, highest priority first (Slurm's default_queue_depth): a pass costs the same "
        "however deep the queue, and a job deeper than this waits for those ahead of it."
    )
    backfill_reserve_depth: int = Field(
        8, ge=1, description="How many blocked jobs at the head of the queue, in priority "
        "order, get a reservation (GPUs and a start time from the running jobs' limits) in "
        "a dispatch pass; jobs behind them start now only where they delay none (backfill)."
    )
    fair_share: bool = Field(
        True, description="Among PENDING jobs of equal priority, start first those of the "
        "user (or project, GPUQ_FAIR_SHARE_BY) with the least decayed GPU time per unit of "
        "weight; off: oldest first.")
    fair_share_by: str = Field(
        "user", pattern="^(user|project)$", description="Whom fair share compares: user or "
        "project (each weighted by its `gpuq limits set --weight`).")
    fair_share_half_life_days: float = Field(
        7.0, gt=0, description="GPU time used this long ago counts half in fair share.")
    fair_share_min_charge_s: float = Field(
        60.0, ge=0, description="Fair share counts a running attempt as at least this many "
        "seconds per GPU, so that GPUs freed together are shared out, not all given to one "
        "user whose jobs just started.")
    limits_file: Path | None = Field(
        None, description="A TOML file of limits and weights ([user.NAME] / [project.NAME] "
        "tables of max_gpus, max_pending, max_cpu_jobs, max_priority, weight, "
        "default_project; NAME * for everyone), read beside `gpuq limits set`, which wins "
        "where both name one field. Unset: limits.toml in `home` when it exists.")
    open_projects: bool = Field(
        False, description="Let every named user submit to any project, as before projects "
        "had members; off: a named user names only their default project or one they are a "
        "member of (`gpuq project members NAME --add USER`).")
    consumer_stall_s: float = Field(
        30.0, gt=0, description="A worker whose queue has held messages this long while it "
        "held none is restarted (its broker consumer stopped taking messages)."
    )
    dispatch_interval_s: float = Field(
        2.0, gt=0, description="Period of the safety-net dispatch pass run by beat."
    )
    busy_memory_mb: int = Field(
        1024, ge=0, description="A GPU gpuq does not hold, using more memory than this, is busy."
    )
    busy_utilization_pct: int = Field(
        10, ge=0, le=100, description="A GPU gpuq does not hold, busier than this, is busy."
    )
    monitor_interval_s: float = Field(
        5.0, gt=0, description="How often each GPU worker reads its GPU (NVML or fake)."
    )
    preflight_commands: dict[str, str] = Field(
        default_factory=dict,
        description="Extra preflight checks by name (JSON), run like the built-in `nccl`: "
        "exit 0 passes, 3 skips (last line says why), anything else fails the job.",
    )
    preflight_timeout_s: float = Field(120.0, gt=0, description="Longest a preflight may run.")
    max_payload_bytes: int = Field(
        64 * 2**20, gt=0, description="Largest stored payload (after gzip) a launch may carry."
    )
    payload_ttl_s: int = Field(
        14 * 86400, gt=0, description="A launch's payload outlives it by at most this long."
    )
    max_result_bytes: int = Field(
        16 * 2**20, gt=0, description="Largest result a function job may return."
    )
    keep_result_s: int = Field(7 * 86400, gt=0, description="How long results are kept.")
    log_max_bytes: int = Field(
        2**30, ge=4096, description="Largest job log: past it the log keeps its first half "
        "and its newest part, with a line saying how many bytes were dropped between them."
    )
    keep_finished_days: float = Field(
        30.0, ge=0, description="Finished jobs (rows, events, logs, payloads) are deleted "
        "this many days after they ended; 0 keeps them for ever."
    )
    prune_interval_s: float = Field(
        3600.0, gt=0, description="How often finished jobs past GPUQ_KEEP_FINISHED_DAYS are "
        "deleted (the database by beat, each host's files by its `gpuq worker`)."
    )
    aws_batch_queue: str | None = Field(None, description="AWS Batch job queue for --backend "
                                        "aws_batch.")
    aws_batch_job_definition: str = Field(
        "gpuq", description="AWS Batch job definition; its image must have gpuq installed.")
    aws_s3_bucket: str | None = Field(
        None, description="S3 bucket for aws_batch payloads over the inline limit and results.")
    aws_region: str = Field("us-east-1", description="AWS region of the Batch queue and bucket.")
    aws_endpoint_url: str | None = Field(
        None, description="Another AWS endpoint (a moto or LocalStack server, say).")
    slurm_partition: str | None = Field(
        None, description="Slurm partition for --backend slurm (the cluster's default if unset).")
    slurm_account: str | None = Field(None, description="Slurm account to charge, if any.")
    slurm_time_limit: str | None = Field(
        None, description="Slurm time limit per job (sbatch --time, e.g. 1-00:00:00).")
    slurm_gpu_option: str = Field(
        "gpus", description="How Slurm jobs ask for GPUs: 'gpus' (--gpus=N) or 'gres' "
        "(--gres=gpu:N), as the cluster is configured.")
    batch_python: str | None = Field(
        None, description="The Python that batch jobs run gpuq's runner with on the backend's "
        "nodes (it needs cloudpickle and gpuq's `adapters` package; every account jobs run as "
        "must be able to run it): this worker's own Python if unset.")
    slurm_shared_dir: Path | None = Field(
        None, description="A directory every Slurm node sees, for payloads, results and "
        "output files (gpuq's home if unset).")
    k8s_namespace: str = Field("default", description="Kubernetes namespace for --backend "
                               "kubernetes.")
    k8s_image: str = Field("gpuq:latest", description="Container image of Kubernetes jobs; "
                           "it must have gpuq installed.")
    k8s_api_url: str | None = Field(
        None, description="Kubernetes API server; unset means in-cluster config or kubeconfig.")
    k8s_context: str | None = Field(None, description="kubeconfig context to use, if not "
                                    "the current one.")
    k8s_store_claim: str | None = Field(
        None, description="A PersistentVolumeClaim (ReadWriteMany) that every Kubernetes job "
        "mounts at gpuq's store directory, so that function results come back.")
    reconcile_interval_s: float = Field(
        10.0, gt=0, description="Period of the repair pass for lost messages and dead workers."
    )
    cpu_slots: int = Field(2, ge=0, description="Concurrent 0-GPU jobs per host.")
    op_timeout_s: float = Field(
        DEFAULT_OP_TIMEOUT_S, gt=0,
        description="How long a remote operation may take before the client gives up."
    )
    visibility_timeout_s: int = Field(
        3600, gt=0, description="Redis broker visibility timeout (messages are acked early)."
    )
    flower_address: str = Field("127.0.0.1", description="Address Flower binds to.")
    flower_port: int = Field(5555, description="Port Flower listens on.")
    flower_basic_auth: str | None = Field(
        None, description="user:password that Flower asks for (several comma-separated); "
        "required when GPUQ_FLOWER_ADDRESS is beyond loopback. Unset: user gpuq and a "
        "password generated at first start and kept 0600 in `home` (flower.password).")
    dashboard_address: str = Field(
        "127.0.0.1", description="Address the dashboard binds to.")
    dashboard_port: int = Field(5556, ge=0, le=65535, description="Port the dashboard "
                                "listens on.")
    dashboard_token: str | None = Field(
        None, description="Token the dashboard asks for on every request (Bearer header, or "
        "?token= once in a browser). Unset: one generated at first start and kept 0600 in "
        "`home` (dashboard.token); `gpuq dashboard --url` prints the login address.")
    dashboard_hosts: str = Field(
        "", description="More host names the dashboard answers to, comma-separated (NAME "
        "for any port, NAME:PORT for one), e.g. the name of a proxy in front of it. It "
        "always answers to its bind address and to 127.0.0.1, localhost and [::1] on its "
        "port; a request for any other Host gets 403 (DNS rebinding).")
    jobs_file: Path | None = Field(
        None, description="A jobs file that `gpuq up` watches (one job per line)."
    )
    log_level: str = Field("WARNING", description="Log level of gpuq's processes.")
    secret: str | None = Field(
        None, description="Shared secret: every control and run message, stored payload "
        "and result carries an HMAC-SHA256 with a key derived from it, and workers refuse "
        "one that does not verify. Unset: anyone who can write to Redis can run code on the "
        "workers, so workers refuse to start unless Redis is on loopback.")
    embedded_redis_bind: str = Field(
        "127.0.0.1", description="Address the embedded Redis binds to; beyond loopback it "
        "needs GPUQ_EMBEDDED_REDIS_PASSWORD and GPUQ_SECRET.")
    embedded_redis_password: str | None = Field(
        None, description="Password of the embedded Redis (requirepass).")

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        # Workers and clients may run from other directories: agree on one absolute path.
        return value.expanduser().resolve()

    @field_validator("redis_url")
    @classmethod
    def _readable_sentinel_url(cls, value: str | None) -> str | None:
        from app.core.sentinel import SentinelUrl

        if value is not None:
            SentinelUrl.parse(value)  # a malformed sentinel:// URL is refused here
        return value

    @field_validator("transport")
    @classmethod
    def _known_transport(cls, value: str) -> str:
        if value not in ("local", "remote", "http"):
            raise ValueError("GPUQ_TRANSPORT must be 'local', 'remote' or 'http'")
        return value

    @field_validator("flower_basic_auth")
    @classmethod
    def _user_colon_password(cls, value: str | None) -> str | None:
        if value is not None and not all(
                user and password for user, _, password in
                (pair.partition(":") for pair in value.split(","))):
            raise ValueError("GPUQ_FLOWER_BASIC_AUTH takes user:password (comma-separate "
                             "several pairs)")
        return value

    @field_validator("hostname")
    @classmethod
    def _queue_safe_hostname(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
            raise ValueError("GPUQ_HOSTNAME may hold only letters, digits, '.', '_' and '-'")
        return value

    @model_validator(mode="after")
    def _lease_outlasts_a_stop(self) -> Settings:
        # A worker must be able to renew at least once and still stop its job in time.
        least = 2 * self.heartbeat_s + self.kill_grace_s + LEASE_SAFETY_S
        if self.reservation_ttl_s <= least:
            raise ValueError(
                f"GPUQ_RESERVATION_TTL_S ({self.reservation_ttl_s}) must exceed twice "
                f"GPUQ_HEARTBEAT_S plus GPUQ_KILL_GRACE_S plus {LEASE_SAFETY_S:g} ({least:g}); "
                "raise it or lower those")
        return self

    @property
    def lease_stop_s(self) -> float:
        """How long after its last renewal a worker stops its job: the job is gone before
        its lease runs out, so it never runs in two places."""
        return self.reservation_ttl_s - self.kill_grace_s - LEASE_SAFETY_S

    @property
    def preflight_checks(self) -> dict[str, str]:
        """Every preflight check by name: the built-in `nccl`, then GPUQ_PREFLIGHT_COMMANDS."""
        builtin = {"nccl": f"{sys.executable} -m scheduler.worker.preflight nccl"}
        return {**builtin, **self.preflight_commands}

    @property
    def tmux_socket(self) -> Path:
        """The tmux server of attachable jobs on this host."""
        return self.home / "tmux.sock"

    @property
    def redis_dir(self) -> Path:
        return self.home / "redis"

    @property
    def sqlite_url(self) -> str:
        return f"sqlite:///{self.home / 'gpuq.db'}"  # sqlite_file's

    @property
    def sqlite_file(self) -> Path | None:
        """The SQLite file gpuq keeps its database in; None when GPUQ_DATABASE_URL names
        another database."""
        return None if self.database_url else self.home / "gpuq.db"

    def effective_database_url(self) -> str:
        return self.database_url or self.sqlite_url

    def as_environment(self) -> dict[str, str]:
        """These settings as GPUQ_* variables, for processes that must share them."""
        env = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is not None:
                text = json.dumps(value) if isinstance(value, dict | list) else str(value)
                env[f"GPUQ_{name.upper()}"] = text
        return env

    def masked(self) -> dict[str, Any]:
        """Settings as plain values with passwords in URLs replaced by a mask."""
        values = self.model_dump(mode="json")
        for key, value in values.items():
            if isinstance(value, str):
                values[key] = mask_url(value)
        if self.dashboard_token:
            values["dashboard_token"] = SECRET_MASK
        for name in ("secret", "embedded_redis_password", "token"):
            if getattr(self, name):
                values[name] = SECRET_MASK
        if self.flower_basic_auth:
            values["flower_basic_auth"] = SECRET_MASK
        return values


def mask_url(value: str) -> str:
    """Hide the password parts of a URL such as redis://user:secret@host (and a sentinel://
    URL's sentinel_password)."""
    value = re.sub(r"(://[^:/@]*:)[^@/]+@", rf"\g<1>{SECRET_MASK}@", value)
    return re.sub(r"([?&]sentinel_password=)[^&]*", rf"\g<1>{SECRET_MASK}", value)
