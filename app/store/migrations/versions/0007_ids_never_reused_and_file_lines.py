"""Ids are never reused, and the lines of jobs files are kept apart from their jobs.

On SQLite, `jobs.id` and `launches.id` were INTEGER PRIMARY KEY, which hands out the
largest id in the table plus one: once the newest jobs were pruned, a new job took a
pruned job's id, and with it that job's attempts and its log file. Both tables are
rebuilt with AUTOINCREMENT, every row, id and index kept (the partial indexes too, from
their own SQL); the ids start after the largest ever recorded, the attempts' included,
since jobs pruned before this upgrade left their ids there. PostgreSQL's sequences never
go back: nothing to do there.

`jobs_file_lines` holds each jobs-file line that was submitted and the job it made, so
that retention can prune the job and the line is still known; filled here from the jobs
that came from a file (the newest job of each line).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

REBUILT = (("launches", "id", "launch_id"), ("jobs", "id", "job_id"))


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _outside_foreign_keys(_rebuild_with_autoincrement)
    op.create_table(
        "jobs_file_lines",
        sa.Column("origin", sa.String(), nullable=False),
        sa.Column("line_key", sa.String(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("stored_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("origin", "line_key"),
    )
    _known_lines()


def downgrade() -> None:
    op.drop_table("jobs_file_lines")  # AUTOINCREMENT stays: the ids it kept are still used


def _outside_foreign_keys(work: Callable[[], None]) -> None:
    """Run `work` with SQLite's foreign keys off, as a table others refer to can only be
    dropped and renamed that way; the pragma is ignored inside a transaction, so what came
    before is committed first (its revision recorded: a crash leaves a database at 0006,
    and this rebuild runs again whole). The keys are checked before the rebuild commits,
    and turned back on for the connection's next users."""
    bind = op.get_bind()
    driver = bind.connection.dbapi_connection
    if driver.in_transaction:  # type: ignore[union-attr]
        bind.exec_driver_sql("COMMIT")
    bind.exec_driver_sql("PRAGMA foreign_keys=OFF")
    try:
        bind.exec_driver_sql("BEGIN IMMEDIATE")
        work()
        broken = bind.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise RuntimeError(f"the rebuilt tables break foreign keys: {broken[:5]}")
        bind.exec_driver_sql("COMMIT")
    except BaseException:
        if driver.in_transaction:  # type: ignore[union-attr]
            bind.exec_driver_sql("ROLLBACK")
        raise
    finally:
        bind.exec_driver_sql("PRAGMA foreign_keys=ON")
        bind.exec_driver_sql("BEGIN IMMEDIATE")  # the rest of the upgrade, and its revision


def _rebuild_with_autoincrement() -> None:
    bind = op.get_bind()
    for table, _, referred_as in REBUILT:
        # Every index as it was written (partial, descending), recreated from its own SQL.
        indexes = bind.execute(sa.text(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = :t "
            "AND sql IS NOT NULL"), {"t": table}).all()
        for name, _ in indexes:
            op.drop_index(name, table_name=table)
        with op.batch_alter_table(table, recreate="always",
                                  table_kwargs={"sqlite_autoincrement": True}):
            pass
        for _, sql in indexes:
            bind.exec_driver_sql(sql)
        # The next id comes after every id ever handed out, pruned jobs' included.
        used = bind.execute(sa.text(
            f"SELECT max(coalesce((SELECT max(id) FROM {table}), 0), "
            f"coalesce((SELECT max({referred_as}) FROM attempts), 0))")).scalar() or 0
        bind.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = :t"), {"t": table})
        bind.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES (:t, :seq)"),
                     {"t": table, "seq": used})


def line_key(content_hash: str | None, name: str | None) -> str:
    """app/store/file_jobs.py's line_key as of this revision."""
    return hashlib.sha256(json.dumps([content_hash, name]).encode()).hexdigest()[:32]


def _known_lines() -> None:
    bind = op.get_bind()
    newest: dict[tuple[str, str], int] = {}
    stored: dict[tuple[str, str], float] = {}
    for job_id, origin, content_hash, name, submitted_at in bind.execute(sa.text(
            "SELECT id, origin, content_hash, name, submitted_at FROM jobs "
            "WHERE origin IS NOT NULL ORDER BY id")):
        key = (origin, line_key(content_hash, name))
        newest[key] = job_id
        stored[key] = submitted_at
    if newest:
        lines = sa.table("jobs_file_lines", sa.column("origin"), sa.column("line_key"),
                         sa.column("job_id"), sa.column("stored_at"))
        op.bulk_insert(lines, [{"origin": origin, "line_key": key, "job_id": job_id,
                                "stored_at": stored[(origin, key)]}
                               for (origin, key), job_id in sorted(newest.items())])
