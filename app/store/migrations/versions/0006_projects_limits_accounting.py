"""Projects, limits and fair-share weights, the record of every attempt, and decayed usage.

Every job and launch gets a project (those stored before take their owner's name, the
default project of a user who names none). The GPU candidates' index orders by owner and
project within a priority, so that a pass reads each (owner, project) group's head of a
priority in a seek; a user's and a
project's PENDING jobs are counted through their own indexes against the pending limits.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _condition(dialect: str) -> str:
    waiting = "waiting = 0" if dialect == "sqlite" else "waiting = false"
    return f"state = 'PENDING' AND {waiting} AND backend = 'local' AND gpus > 0"


def upgrade() -> None:
    for table in ("jobs", "launches"):
        op.add_column(table, sa.Column("project", sa.String(), nullable=False,
                                       server_default=""))
        op.execute(sa.text(f"UPDATE {table} SET project = owner"))
    op.create_index("ix_jobs_owner_state", "jobs", ["owner", "state"])
    op.create_index("ix_jobs_project_state", "jobs", ["project", "state"])
    op.drop_index("ix_jobs_pending_gpu", table_name="jobs")
    op.create_index("ix_jobs_pending_gpu_by_owner", "jobs",
                    ["state", "waiting", "backend", sa.text("priority DESC"), "owner",
                     "project", "id"],
                    sqlite_where=sa.text(_condition("sqlite")),
                    postgresql_where=sa.text(_condition("postgresql")))
    op.create_table(
        "limits",
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("max_gpus", sa.Integer(), nullable=True),
        sa.Column("max_pending", sa.Integer(), nullable=True),
        sa.Column("weight", sa.Float(), nullable=True),
        sa.Column("default_project", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("kind", "name"),
    )
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("project", sa.String(), nullable=False),
        sa.Column("launch_id", sa.Integer(), nullable=True),
        sa.Column("backend", sa.String(), nullable=False),
        sa.Column("host", sa.String(), nullable=True),
        sa.Column("gpu_ids", sa.JSON(), nullable=True),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("ended_at", sa.Float(), nullable=False),
        sa.Column("gpu_seconds", sa.Float(), nullable=False),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("wait_s", sa.Float(), nullable=True),
        sa.Column("peak_memory_mb", sa.Integer(), nullable=True),
        sa.Column("mean_utilization_pct", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_attempts_ended", "attempts", ["ended_at"])
    op.create_index("ix_attempts_job", "attempts", ["job_id", "attempt"])
    op.create_table(
        "usage",
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("gpu_seconds", sa.Float(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "name"),
    )


def downgrade() -> None:
    op.drop_table("usage")
    op.drop_index("ix_attempts_job", table_name="attempts")
    op.drop_index("ix_attempts_ended", table_name="attempts")
    op.drop_table("attempts")
    op.drop_table("limits")
    op.drop_index("ix_jobs_pending_gpu_by_owner", table_name="jobs")
    gpus = "state = 'PENDING' AND {w} AND backend = 'local' AND gpus > 0"
    op.create_index("ix_jobs_pending_gpu", "jobs",
                    ["state", "waiting", "backend", sa.text("priority DESC"), "id"],
                    sqlite_where=sa.text(gpus.format(w="waiting = 0")),
                    postgresql_where=sa.text(gpus.format(w="waiting = false")))
    op.drop_index("ix_jobs_project_state", table_name="jobs")
    op.drop_index("ix_jobs_owner_state", table_name="jobs")
    for table in ("launches", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("project")
