"""Named users map to OS accounts, and their tokens have a life.

- `users.os_user`: the OS account a named user's jobs run as, on a stack run by root.
- `users.same_account`: their jobs run as the stack's own account, by the owner's choice.
- `users.expires_at`: the epoch after which their token names no one (NULL: never).
- `users.last_used_at`: when their token was last shown (written at most once a minute).

Users added before this revision get neither an account nor the choice (os_user NULL,
same_account false): their jobs keep running as the stack's own account, as they did, and
`gpuq user list` shows them so; revoking and adding them again maps them to an account.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("os_user", sa.String(), nullable=True))
        batch.add_column(sa.Column("same_account", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("expires_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("last_used_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("last_used_at")
        batch.drop_column("expires_at")
        batch.drop_column("same_account")
        batch.drop_column("os_user")
