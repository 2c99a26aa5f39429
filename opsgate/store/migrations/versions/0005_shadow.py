"""Shadow policies: the shadow bundle's verdict beside each decision.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON(none_as_null=True).with_variant(
        postgresql.JSONB(none_as_null=True), "postgresql"
    )


def upgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("shadow", _json(), nullable=True))
    op.create_index(
        "ix_decisions_shadow",
        "decisions",
        ["decided_at"],
        sqlite_where=sa.text("shadow IS NOT NULL"),
        postgresql_where=sa.text("shadow IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_decisions_shadow", table_name="decisions")
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("shadow")
