"""Projects are granted, and so are priorities.

- `project_members` (name, member): the named users an admin let submit to a project
  (`gpuq project members`). Without GPUQ_OPEN_PROJECTS a named user names only their default
  project or one they are a member of.
- `limits.max_priority`: the highest priority a user's (or a project's) jobs may be
  submitted at; NULL: a named user's default, 0 (a project's: no limit).

A stack upgraded from 0010 has no members: its named users keep their default projects,
and an admin grants the others, or sets GPUQ_OPEN_PROJECTS=true to keep the old rule.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-14
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "project_members",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("member", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("name", "member"),
    )
    with op.batch_alter_table("limits") as batch:
        batch.add_column(sa.Column("max_priority", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("limits") as batch:
        batch.drop_column("max_priority")
    op.drop_table("project_members")
