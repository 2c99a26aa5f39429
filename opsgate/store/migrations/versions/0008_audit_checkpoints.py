"""Signed audit checkpoints: the chain's head, signed by the worker/server tier's key.
Idempotency keys scoped to their proposer: unique per (proposer_id, idempotency_key).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("hash", sa.String(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key_id", sa.String(), nullable=False),
        sa.Column("signature", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_checkpoints_seq", "audit_checkpoints", ["seq"])
    with op.batch_alter_table("actions") as batch:
        batch.drop_constraint("uq_actions_idempotency_key", type_="unique")
        batch.create_unique_constraint(
            "uq_actions_proposer_id_idempotency_key", ["proposer_id", "idempotency_key"]
        )


def downgrade() -> None:
    # Fails if two proposers now share a key, as it must: the old constraint cannot hold.
    with op.batch_alter_table("actions") as batch:
        batch.drop_constraint("uq_actions_proposer_id_idempotency_key", type_="unique")
        batch.create_unique_constraint("uq_actions_idempotency_key", ["idempotency_key"])
    op.drop_index("ix_audit_checkpoints_seq", table_name="audit_checkpoints")
    op.drop_table("audit_checkpoints")
