"""The schema of gpuq 0.1: jobs, job_events, launches, job_dependencies.

A database the gpuq of before migrations made has exactly these tables and no
alembic_version; `gpuq db upgrade` stamps it at this revision.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "launches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=True),
        sa.Column("num_jobs", sa.Integer(), nullable=False),
        sa.Column("command", sa.String(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("payload_key", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=True),
        sa.Column("launch_id", sa.Integer(), nullable=True),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("num_jobs", sa.Integer(), nullable=False),
        sa.Column("command", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("payload_key", sa.String(), nullable=True),
        sa.Column("env", sa.JSON(), nullable=False),
        sa.Column("workdir", sa.String(), nullable=True),
        sa.Column("venv", sa.String(), nullable=True),
        sa.Column("conda_env", sa.String(), nullable=True),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("allowed_gpu_ids", sa.JSON(), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("backend", sa.String(), nullable=False),
        sa.Column("backend_id", sa.String(), nullable=True),
        sa.Column("dispatched_at", sa.Float(), nullable=True),
        sa.Column("preflight", sa.String(), nullable=True),
        sa.Column("tmux", sa.Boolean(), nullable=False),
        sa.Column("origin", sa.String(), nullable=True),
        sa.Column("waiting", sa.Boolean(), nullable=False),
        sa.Column("max_restarts", sa.Integer(), nullable=False),
        sa.Column("recover_exit_codes", sa.JSON(), nullable=False),
        sa.Column("content_hash", sa.String(), nullable=True),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("host", sa.String(), nullable=True),
        sa.Column("gpu_ids", sa.JSON(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("restart_count", sa.Integer(), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("submitted_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("runtime_s", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["launch_id"], ["launches.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_jobs_content_hash", "jobs", ["content_hash"])
    op.create_index("ix_jobs_dispatch", "jobs", ["state", "waiting", "priority", "id"])
    op.create_index("ix_jobs_dispatch_cpu", "jobs", ["state", "gpus", "priority", "id"])
    op.create_index("ix_jobs_launch_rank", "jobs", ["launch_id", "rank"])
    op.create_index("ix_jobs_launch_state", "jobs", ["launch_id", "state"])
    op.create_index("ix_jobs_name", "jobs", ["name"])
    op.create_table(
        "job_dependencies",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("after_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["after_id"], ["jobs.id"]),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("job_id", "after_id"),
    )
    op.create_index("ix_job_dependencies_after_id", "job_dependencies", ["after_id"])
    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("from_state", sa.String(), nullable=True),
        sa.Column("to_state", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_job_events_job_id", "job_events", ["job_id"])


def downgrade() -> None:
    op.drop_table("job_events")
    op.drop_table("job_dependencies")
    op.drop_table("jobs")
    op.drop_table("launches")
