"""An attempt's CPU time and host memory, read from the container it ran in.

- `attempts.cpu_s`: CPU seconds of everything the attempt started (its cgroup's
  `cpu.stat`); NULL where the worker had no cgroup to read it from.
- `attempts.peak_host_memory_mb`: the most host memory it held at once (`memory.peak`, or
  a v1 memory cgroup's `memory.max_usage_in_bytes`); NULL where none was read.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("cpu_s", sa.Float(), nullable=True))
        batch.add_column(sa.Column("peak_host_memory_mb", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("peak_host_memory_mb")
        batch.drop_column("cpu_s")
