"""Execution: claims and leases, the measurements behind verification, and workers.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _big_integer() -> sa.types.TypeEngine[Any]:
    # INTEGER on SQLite: an INTEGER PRIMARY KEY is the rowid itself, not a second B-tree.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "executions",
        sa.Column("action_id", sa.String(), nullable=False),
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("environment", sa.String(), nullable=False),
        sa.Column("worker_id", sa.String(), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("captured", _json(), nullable=False),
        sa.Column("capture_output", sa.Text(), nullable=False),
        sa.Column("run_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_exit_code", sa.Integer(), nullable=True),
        sa.Column("run_output", sa.Text(), nullable=False),
        sa.Column("run_error", sa.Text(), nullable=True),
        sa.Column("verify_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("verify_state", _json(), nullable=True),
        sa.Column("outcome", sa.String(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("trigger_name", sa.String(), nullable=True),
        sa.Column("trigger_kind", sa.String(), nullable=True),
        sa.Column("trigger_value", sa.Float(), nullable=True),
        sa.Column("rollback_decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rollback_requested_by", sa.String(), nullable=True),
        sa.Column("undo_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("undo_finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("undo_exit_code", sa.Integer(), nullable=True),
        sa.Column("undo_output", sa.Text(), nullable=False),
        sa.Column("undo_error", sa.Text(), nullable=True),
        sa.Column("rollback_verify_state", _json(), nullable=True),
        sa.Column("rollback_verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("recovered_from", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(
            ["action_id"], ["actions.id"], name="fk_executions_action_id_actions"
        ),
        sa.PrimaryKeyConstraint("action_id", name="pk_executions"),
    )
    op.create_index("ix_executions_worker_id", "executions", ["worker_id"])
    op.create_index("ix_executions_lease_expires_at", "executions", ["lease_expires_at"])
    # At most one unfinished execution per target, enforced by the database.
    op.create_index(
        "ix_executions_target_environment",
        "executions",
        ["target", "environment"],
        unique=True,
        sqlite_where=sa.text("finished_at IS NULL"),
        postgresql_where=sa.text("finished_at IS NULL"),
    )

    op.create_table(
        "measurements",
        sa.Column("id", _big_integer(), autoincrement=True, nullable=False),
        sa.Column("action_id", sa.String(), nullable=False),
        sa.Column("phase", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["action_id"], ["actions.id"], name="fk_measurements_action_id_actions"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_measurements"),
    )
    op.create_index("ix_measurements_action_id_id", "measurements", ["action_id", "id"])

    op.create_table(
        "workers",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("hostname", sa.String(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_workers"),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index("ix_measurements_action_id_id", table_name="measurements")
    op.drop_table("measurements")
    op.drop_index("ix_executions_target_environment", table_name="executions")
    op.drop_index("ix_executions_lease_expires_at", table_name="executions")
    op.drop_index("ix_executions_worker_id", table_name="executions")
    op.drop_table("executions")
