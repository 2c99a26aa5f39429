"""Report segments: one small id per (severity, class, tier, environment, action,
proposer kind), copied onto decisions and executions, with covering indexes, so reports
over millions of actions group by an integer without joining.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY = ("severity", "incident_class", "tier", "environment", "action", "proposer_kind")


def upgrade() -> None:
    op.create_table(
        "segments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        *(sa.Column(name, sa.String(), nullable=False) for name in _KEY),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_segments")),
        sa.UniqueConstraint(*_KEY, name=op.f("uq_segments_" + "_".join(_KEY))),
    )
    with op.batch_alter_table("actions") as batch:
        batch.add_column(sa.Column("segment_id", sa.Integer(), nullable=True))
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("segment_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("deny_key", sa.String(), nullable=True))
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("segment_id", sa.Integer(), nullable=True))
    _backfill()
    op.drop_index("ix_actions_created_at", table_name="actions")
    op.drop_index("ix_executions_run_started_at", table_name="executions")
    op.drop_index("ix_executions_rollback_decided_at", table_name="executions")
    op.create_index(
        "ix_actions_report", "actions", ["created_at", "segment_id", "state", "approved_at"]
    )
    op.create_index(
        "ix_decisions_report",
        "decisions",
        ["phase", "decided_at", "segment_id", "allow", "deny_key"],
    )
    op.create_index(
        "ix_executions_report",
        "executions",
        ["run_started_at", "segment_id", "outcome", "trigger_name"],
    )
    op.create_index(
        "ix_executions_rollbacks",
        "executions",
        ["rollback_decided_at", "segment_id", "rollback_verified_at"],
    )


def _backfill() -> None:
    """Existing rows get their segment; the SQL is fixed text, no data is spliced in."""
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.execute(
        "INSERT INTO segments (severity, incident_class, tier, environment, action, "
        "proposer_kind) SELECT DISTINCT COALESCE(incident_severity, ''), "
        "COALESCE(incident_class, ''), COALESCE(incident_tier, ''), environment, "
        "action_type, proposer_kind FROM actions"
    )
    op.execute(
        "UPDATE actions SET segment_id = (SELECT s.id FROM segments s WHERE "
        "s.severity = COALESCE(actions.incident_severity, '') AND "
        "s.incident_class = COALESCE(actions.incident_class, '') AND "
        "s.tier = COALESCE(actions.incident_tier, '') AND "
        "s.environment = actions.environment AND s.action = actions.action_type AND "
        "s.proposer_kind = actions.proposer_kind)"
    )
    codes = "deny_codes::text" if postgresql else "deny_codes"
    op.execute(
        "UPDATE decisions SET segment_id = (SELECT a.segment_id FROM actions a "
        f"WHERE a.id = decisions.action_id), deny_key = CASE WHEN allow THEN NULL "
        f"ELSE {codes} END"
    )
    op.execute(
        "UPDATE executions SET segment_id = (SELECT a.segment_id FROM actions a "
        "WHERE a.id = executions.action_id)"
    )


def downgrade() -> None:
    op.drop_index("ix_executions_rollbacks", table_name="executions")
    op.drop_index("ix_executions_report", table_name="executions")
    op.drop_index("ix_decisions_report", table_name="decisions")
    op.drop_index("ix_actions_report", table_name="actions")
    op.create_index("ix_actions_created_at", "actions", ["created_at"])
    op.create_index("ix_executions_run_started_at", "executions", ["run_started_at"])
    op.create_index("ix_executions_rollback_decided_at", "executions", ["rollback_decided_at"])
    with op.batch_alter_table("executions") as batch:
        batch.drop_column("segment_id")
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("deny_key")
        batch.drop_column("segment_id")
    with op.batch_alter_table("actions") as batch:
        batch.drop_column("segment_id")
    op.drop_table("segments")
