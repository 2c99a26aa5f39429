"""Trust resets: a human lifting `trust_revoked` for one proposer and action type.

Revision ID: 0010
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "trust_resets",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("proposer_id", sa.String(), nullable=False),
        sa.Column("action_type", sa.String(), nullable=False),
        sa.Column("reset_by", sa.String(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trust_resets")),
    )
    op.create_index(
        "ix_trust_resets_proposer_id_action_type_at",
        "trust_resets",
        ["proposer_id", "action_type", "at"],
    )


def downgrade() -> None:
    op.drop_index("ix_trust_resets_proposer_id_action_type_at", table_name="trust_resets")
    op.drop_table("trust_resets")
