"""Jobs per launch and state, kept beside the jobs: `gpuq status`, `gpuq launches`, a
launch's wait and `gpuq queue --status`'s total read a few rows instead of counting
millions. Filled here from the jobs as they are.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
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


def downgrade() -> None:
    op.drop_table("job_counts")
