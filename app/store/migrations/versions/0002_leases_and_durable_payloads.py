"""Leases, process identity, restart backoff, and payloads kept in the database.

- jobs.lease_until: until when the attempt's worker holds its lease (epoch seconds); the
  worker renews it, the reconciler settles an attempt only once it has run out.
- jobs.pid_identity: what the job's process was when it started (boot id and start time),
  so that recovery never signals a process group that merely reuses the pid.
- jobs.not_before: a restarted job is not dispatched before this time (backoff).
- payloads: a launch's payload (command, rank arguments, sealed secrets, pickled call),
  durable here; Redis keeps a cache of it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_until", sa.Float(), nullable=True))
        batch.add_column(sa.Column("pid_identity", sa.String(), nullable=True))
        batch.add_column(sa.Column("not_before", sa.Float(), nullable=True))
    op.create_table(
        "payloads",
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )


def downgrade() -> None:
    op.drop_table("payloads")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("not_before")
        batch.drop_column("pid_identity")
        batch.drop_column("lease_until")
