"""Kept counts per owner, an index of the batch jobs waiting, and limits on 0-GPU jobs.

- `job_counts` is keyed by owner too (launch, owner, state, slot), so that /metrics reads
  each user's jobs per state from a few rows instead of grouping every pending job;
  refilled here from the jobs as they are.
- `ix_jobs_pending_batch`: the PENDING jobs of batch backends, by backend and id, so that
  a sync reads the jobs it has room to submit, not every job queued.
- `limits.max_cpu_jobs`: 0-GPU jobs a user or project may run at once.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

BATCH_PENDING = "state = 'PENDING' AND backend <> 'local'"


def upgrade() -> None:
    op.drop_table("job_counts")
    op.create_table(
        "job_counts",
        sa.Column("launch_id", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("launch_id", "owner", "state", "slot"),
    )
    op.execute("INSERT INTO job_counts (launch_id, owner, state, slot, n) "
               "SELECT COALESCE(launch_id, 0), owner, state, 0, COUNT(*) FROM jobs "
               "GROUP BY COALESCE(launch_id, 0), owner, state")
    op.create_index("ix_jobs_pending_batch", "jobs", ["backend", "id"],
                    sqlite_where=sa.text(BATCH_PENDING),
                    postgresql_where=sa.text(BATCH_PENDING))
    with op.batch_alter_table("limits") as batch:
        batch.add_column(sa.Column("max_cpu_jobs", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("limits") as batch:
        batch.drop_column("max_cpu_jobs")
    op.drop_index("ix_jobs_pending_batch", table_name="jobs")
    op.drop_table("job_counts")
    op.create_table(
        "job_counts",
        sa.Column("launch_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("launch_id", "state", "slot"),
    )
    op.execute("INSERT INTO job_counts (launch_id, state, slot, n) "
               "SELECT COALESCE(launch_id, 0), state, 0, COUNT(*) FROM jobs "
               "GROUP BY COALESCE(launch_id, 0), state")
