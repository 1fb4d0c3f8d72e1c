"""Who owns each job and launch, and the named users who reach gpuq with a token.

Jobs and launches stored before owners were recorded belong to the OS user who runs the
upgrade: the stack's owner (`gpuq db upgrade`, or the first gpuq process of the stack to
open a database it can bring forward). Before this revision only that user's processes
wrote jobs, so the name is the truth for them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from app.core.identity import stack_owner

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("token_hash", sa.String(), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("revoked_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("name"),
        sa.UniqueConstraint("token_hash"),
    )
    for table in ("jobs", "launches"):
        op.add_column(table, sa.Column("owner", sa.String(), nullable=False,
                                       server_default=""))
        op.execute(sa.text(f"UPDATE {table} SET owner = :owner").bindparams(
            owner=stack_owner().name))
    op.create_index("ix_jobs_owner", "jobs", ["owner", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_owner", table_name="jobs")
    with op.batch_alter_table("launches") as batch:
        batch.drop_column("owner")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("owner")
    op.drop_table("users")
