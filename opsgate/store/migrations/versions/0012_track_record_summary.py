"""The track record's summary: per proposer, type, environment and day, what a decision reads.

Counting a proposer's record from its facts at every decision cost a scan of its history
(about 100 ms at 100,000 actions). The store now keeps the counts as it writes the facts
(opsgate/store/track_summary.py); this revision creates the two tables and counts the
existing history into them with the same functions the store uses.

The backfill runs in Python, so this revision cannot be rendered as offline SQL: an
empty summary would undercount every record (a rolled-back agent would look clean).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COUNTS = (
    "proposals",
    "blocked",
    "with_code",
    "approved",
    "rejected",
    "executed",
    "finished",
    "verified_passes",
    "failed_verifications",
    "stop_conditions",
    "automatic_rollbacks",
    "rollbacks_failed",
)
_LATEST = (
    "last_finished",
    "last_failed_or_rolled_back",
    "last_rolled_back",
    "last_rollback_failed",
)


def upgrade() -> None:
    if op.get_context().as_sql:
        raise RuntimeError(
            "revision 0012 counts the existing history into the track record's summary in "
            "Python; it cannot be rendered as SQL: run `opsgate init` against the database"
        )
    op.create_table(
        "track_record_days",
        sa.Column("proposer_id", sa.String(), nullable=False),
        sa.Column("action_type", sa.String(), nullable=False),
        sa.Column("environment", sa.String(), nullable=False),
        sa.Column("span", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("day", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("code", sa.String(), nullable=False),
        *(sa.Column(name, sa.Integer(), server_default="0", nullable=False) for name in _COUNTS),
        sa.PrimaryKeyConstraint(
            "proposer_id",
            "action_type",
            "environment",
            "span",
            "day",
            "code",
            name=op.f("pk_track_record_days"),
        ),
    )
    op.create_table(
        "track_record_latest",
        sa.Column("proposer_id", sa.String(), nullable=False),
        sa.Column("action_type", sa.String(), nullable=False),
        sa.Column("environment", sa.String(), nullable=False),
        *(sa.Column(name, sa.DateTime(timezone=True), nullable=True) for name in _LATEST),
        sa.PrimaryKeyConstraint(
            "proposer_id", "action_type", "environment", name=op.f("pk_track_record_latest")
        ),
    )
    from opsgate.store import summary_sql

    bind = op.get_bind()
    summary_sql.rebuild(bind, bind.dialect.name)


def downgrade() -> None:
    op.drop_table("track_record_latest")
    op.drop_table("track_record_days")
