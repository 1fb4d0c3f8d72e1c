"""A start time for every waiting job: `jobs.eta` (epoch seconds) and `jobs.eta_basis`
(reservation, limits, siblings, unknown), written by the dispatch pass that reaches a
PENDING job. Jobs stored before have neither until a pass reaches them.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("eta", sa.Float(), nullable=True))
        batch.add_column(sa.Column("eta_basis", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("eta_basis")
        batch.drop_column("eta")
