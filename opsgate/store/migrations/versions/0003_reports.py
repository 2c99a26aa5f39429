"""Reports: when an action was approved, and indexes for report windows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("actions") as batch:
        batch.add_column(sa.Column("approved_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_actions_created_at", "actions", ["created_at"])
    op.create_index("ix_executions_run_started_at", "executions", ["run_started_at"])
    op.create_index("ix_executions_rollback_decided_at", "executions", ["rollback_decided_at"])


def downgrade() -> None:
    op.drop_index("ix_executions_rollback_decided_at", table_name="executions")
    op.drop_index("ix_executions_run_started_at", table_name="executions")
    op.drop_index("ix_actions_created_at", table_name="actions")
    with op.batch_alter_table("actions") as batch:
        batch.drop_column("approved_at")
