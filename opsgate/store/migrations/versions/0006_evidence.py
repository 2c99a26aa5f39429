"""Post-change evidence: a measurement says whether it counted, and if not, why.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows counted: the rule did not exist when they were taken.
    with op.batch_alter_table("measurements") as batch:
        batch.add_column(sa.Column("not_counted", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("measurements") as batch:
        batch.drop_column("not_counted")
