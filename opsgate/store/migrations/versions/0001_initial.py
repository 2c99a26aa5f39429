"""Initial schema: actions, decisions, approvals and the hash-chained audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of opsgate.audit.GENESIS_HASH: a migration must not change when code does.
GENESIS_HASH = "sha256:" + "0" * 64


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _big_integer() -> sa.types.TypeEngine[Any]:
    # INTEGER on SQLite: an INTEGER PRIMARY KEY is the rowid itself, not a second B-tree.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "actions",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("action_type", sa.String(), nullable=False),
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("environment", sa.String(), nullable=False),
        sa.Column("params", _json(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("incident_id", sa.String(), nullable=True),
        sa.Column("incident_severity", sa.String(), nullable=True),
        sa.Column("incident_class", sa.String(), nullable=True),
        sa.Column("incident_tier", sa.String(), nullable=True),
        sa.Column("verification", _json(), nullable=False),
        sa.Column("risk", sa.String(), nullable=False),
        sa.Column("reversible", sa.Boolean(), nullable=False),
        sa.Column("spec_hash", sa.String(), nullable=False),
        sa.Column("proposer_id", sa.String(), nullable=False),
        sa.Column("proposer_kind", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("required_approvals", sa.Integer(), nullable=False),
        sa.Column("approver_roles", _json(), nullable=False),
        sa.Column("idempotency_key", sa.String(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_actions"),
        sa.UniqueConstraint("idempotency_key", name="uq_actions_idempotency_key"),
    )
    op.create_index("ix_actions_state_created_at", "actions", ["state", "created_at"])
    op.create_index(
        "ix_actions_target_environment_state", "actions", ["target", "environment", "state"]
    )
    op.create_index("ix_actions_proposer_id", "actions", ["proposer_id"])

    op.create_table(
        "decisions",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("action_id", sa.String(), nullable=True),
        sa.Column("phase", sa.String(), nullable=False),
        sa.Column("allow", sa.Boolean(), nullable=False),
        sa.Column("deny", _json(), nullable=False),
        sa.Column("deny_codes", _json(), nullable=False),
        sa.Column("required_approvals", sa.Integer(), nullable=False),
        sa.Column("approver_roles", _json(), nullable=False),
        sa.Column("engine", sa.String(), nullable=False),
        sa.Column("bundle_revision", sa.String(), nullable=False),
        sa.Column("input", _json(), nullable=False),
        sa.Column("result", _json(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["action_id"], ["actions.id"], name="fk_decisions_action_id_actions"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_decisions"),
    )
    op.create_index("ix_decisions_action_id_decided_at", "decisions", ["action_id", "decided_at"])
    op.create_index("ix_decisions_decided_at", "decisions", ["decided_at"])

    op.create_table(
        "approvals",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("action_id", sa.String(), nullable=False),
        sa.Column("approver_id", sa.String(), nullable=False),
        sa.Column("approver_kind", sa.String(), nullable=False),
        sa.Column("spec_hash", sa.String(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["action_id"], ["actions.id"], name="fk_approvals_action_id_actions"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_approvals"),
        sa.UniqueConstraint("action_id", "approver_id", name="uq_approvals_action_id_approver_id"),
    )

    op.create_table(
        "audit_events",
        sa.Column("seq", _big_integer(), autoincrement=False, nullable=False),
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("action_id", sa.String(), nullable=True),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("from_state", sa.String(), nullable=True),
        sa.Column("to_state", sa.String(), nullable=True),
        # json, not jsonb: hashed data must read back exactly as written.
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(), nullable=False),
        sa.Column("hash", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_action_id", "audit_events", ["action_id"])

    audit_head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", _big_integer(), nullable=False),
        sa.Column("hash", sa.String(), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_audit_head_single_row"),
        sa.PrimaryKeyConstraint("id", name="pk_audit_head"),
    )
    op.bulk_insert(audit_head, [{"id": 1, "seq": 0, "hash": GENESIS_HASH}])


def downgrade() -> None:
    op.drop_table("audit_head")
    op.drop_index("ix_audit_events_action_id", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("approvals")
    op.drop_index("ix_decisions_decided_at", table_name="decisions")
    op.drop_index("ix_decisions_action_id_decided_at", table_name="decisions")
    op.drop_table("decisions")
    op.drop_index("ix_actions_proposer_id", table_name="actions")
    op.drop_index("ix_actions_target_environment_state", table_name="actions")
    op.drop_index("ix_actions_state_created_at", table_name="actions")
    op.drop_table("actions")
