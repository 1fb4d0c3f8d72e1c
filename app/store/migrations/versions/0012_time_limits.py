"""Time is a resource: a job's time limit, its warning signal, and per-user and per-project
time limits.

- `jobs.time_limit_s`: seconds each attempt may run from its start (NULL: no limit); at the
  limit the job is stopped and ends TIMEOUT, a new terminal state (states are text: no
  enum to alter).
- `jobs.signal`: SIG@SECONDS sent to the job's process group before its limit.
- `limits.max_time_s`, `limits.default_time_s`: the longest limit a user's (or project's)
  jobs may ask for, and the limit of those that give none.

Jobs stored before keep running without a limit.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("time_limit_s", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("signal", sa.String(), nullable=True))
    with op.batch_alter_table("limits") as batch:
        batch.add_column(sa.Column("max_time_s", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("default_time_s", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("limits") as batch:
        batch.drop_column("default_time_s")
        batch.drop_column("max_time_s")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("signal")
        batch.drop_column("time_limit_s")
