"""Post-change evidence and baselines: a measurement says whether it counted, and if
not, why; an execution keeps each query's value from just before `run`.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON(none_as_null=True).with_variant(
        postgresql.JSONB(none_as_null=True), "postgresql"
    )


def upgrade() -> None:
    # Existing rows counted: the rule did not exist when they were taken.
    with op.batch_alter_table("measurements") as batch:
        batch.add_column(sa.Column("not_counted", sa.String(), nullable=True))
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("baseline", _json(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.drop_column("baseline")
    with op.batch_alter_table("measurements") as batch:
        batch.drop_column("not_counted")
