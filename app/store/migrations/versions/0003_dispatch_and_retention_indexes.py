"""The dispatcher's indexes. Its candidates: PENDING local jobs that wait for nothing, in the
order a pass reads them (priority descending, then id), one for GPU jobs and one for 0-GPU
jobs, partial so that they hold only what the dispatcher may start. With them a pass reads
its first candidates without sorting the queue, at any depth. And the local jobs that hold
GPUs (STARTING, RUNNING, CANCELLING), which every pass reads: a few rows among millions.
Finished jobs by when they ended, for their pruning (GPUQ_KEEP_FINISHED_DAYS). A state's
jobs by id, for `gpuq queue --status`; the jobs waiting for others, for the reconciler.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Written out here as they were at this revision; app/store/models.py holds today's.
_INDEXES = (("ix_jobs_pending_gpu", "gpus > 0"), ("ix_jobs_pending_cpu", "gpus = 0"))


def _condition(gpus: str, dialect: str) -> str:
    waiting = "waiting = 0" if dialect == "sqlite" else "waiting = false"
    return f"state = 'PENDING' AND {waiting} AND backend = 'local' AND {gpus}"


_HOLDING = ("state IN ('STARTING', 'RUNNING', 'CANCELLING') AND backend = 'local' "
            "AND gpus > 0")


def upgrade() -> None:
    # The former dispatch indexes served the candidate query only up to a sort of the whole
    # queue, and SQLite's planner preferred them to the new ones: replaced by one on state
    # and id (a state's jobs, newest first), and one of the jobs waiting for others.
    op.drop_index("ix_jobs_dispatch", table_name="jobs")
    op.drop_index("ix_jobs_dispatch_cpu", table_name="jobs")
    op.create_index("ix_jobs_state", "jobs", ["state", "id"])
    op.create_index("ix_jobs_waiting", "jobs", ["id"],
                    sqlite_where=sa.text("state = 'PENDING' AND waiting = 1"),
                    postgresql_where=sa.text("state = 'PENDING' AND waiting"))
    op.create_index("ix_jobs_ended", "jobs", ["ended_at"])
    op.create_index("ix_jobs_holding", "jobs", ["host"], sqlite_where=sa.text(_HOLDING),
                    postgresql_where=sa.text(_HOLDING))
    for name, gpus in _INDEXES:
        op.create_index(name, "jobs", ["state", "waiting", "backend", sa.text("priority DESC"),
                                       "id"],
                        sqlite_where=sa.text(_condition(gpus, "sqlite")),
                        postgresql_where=sa.text(_condition(gpus, "postgresql")))


def downgrade() -> None:
    op.drop_index("ix_jobs_ended", table_name="jobs")
    op.drop_index("ix_jobs_waiting", table_name="jobs")
    op.drop_index("ix_jobs_state", table_name="jobs")
    op.create_index("ix_jobs_dispatch", "jobs", ["state", "waiting", "priority", "id"])
    op.create_index("ix_jobs_dispatch_cpu", "jobs", ["state", "gpus", "priority", "id"])
    op.drop_index("ix_jobs_holding", table_name="jobs")
    for name, _ in _INDEXES:
        op.drop_index(name, table_name="jobs")
