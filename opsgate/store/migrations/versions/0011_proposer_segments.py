"""The proposer in the report segment, and segment-led indexes for its track record.

A decision reads its proposer's track record; narrowing the report queries to one
proposer through `action_id IN (its actions)` cost a set of every action it ever
proposed per query. With the proposer in the segment the narrowing is a handful of
segment ids and each figure an index range over them.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_KEY = ("severity", "incident_class", "tier", "environment", "action", "proposer_kind")
_NEW_KEY = (*_OLD_KEY, "proposer_id")
_INDEXES = {
    ("actions", "ix_actions_segment"): ["segment_id", "created_at", "state", "approved_at"],
    ("decisions", "ix_decisions_segment"): [
        "segment_id",
        "phase",
        "decided_at",
        "allow",
        "deny_key",
    ],
    ("executions", "ix_executions_segment_runs"): [
        "segment_id",
        "run_started_at",
        "outcome",
        "trigger_name",
    ],
    ("executions", "ix_executions_segment_finished"): [
        "segment_id",
        "finished_at",
        "outcome",
        "rollback_decided_at",
        "rollback_verified_at",
    ],
    ("executions", "ix_executions_segment_rollbacks"): [
        "segment_id",
        "rollback_decided_at",
        "rollback_verified_at",
        "finished_at",
        "rollback_requested_by",
    ],
}


def _uq(key: Sequence[str]) -> str:
    return "uq_segments_" + "_".join(key)


def _unique_name(key: Sequence[str]) -> str:
    """The segments key constraint as the database named it (PostgreSQL shortened the
    long conventional name when 0004 created it); offline, the conventional name, which
    the DDL compiler shortens the same way."""
    if op.get_context().as_sql:
        return op.f(_uq(key))
    names = [u["name"] for u in sa.inspect(op.get_bind()).get_unique_constraints("segments")]
    if len(names) != 1 or names[0] is None:
        raise RuntimeError(f"segments: expected one named unique constraint, found {names}")
    return names[0]


def upgrade() -> None:
    old = _unique_name(_OLD_KEY)
    with op.batch_alter_table("segments") as batch:
        batch.add_column(sa.Column("proposer_id", sa.String(), nullable=False, server_default=""))
    with op.batch_alter_table("segments") as batch:
        batch.drop_constraint(old, type_="unique")
        batch.create_unique_constraint(op.f(_uq(_NEW_KEY)), list(_NEW_KEY))
        batch.alter_column("proposer_id", server_default=None)
    _backfill()
    op.create_index("ix_segments_proposer_id", "segments", ["proposer_id"])
    for (table, name), columns in _INDEXES.items():
        op.create_index(name, table, columns)


def _backfill() -> None:
    """Every existing row moves to its proposer's segment; fixed SQL, no data spliced in.
    No fact points at the old proposer-less segments afterwards, so they go."""
    op.execute(
        "INSERT INTO segments (severity, incident_class, tier, environment, action, "
        "proposer_kind, proposer_id) SELECT DISTINCT COALESCE(incident_severity, ''), "
        "COALESCE(incident_class, ''), COALESCE(incident_tier, ''), environment, "
        "action_type, proposer_kind, proposer_id FROM actions"
    )
    op.execute(
        "UPDATE actions SET segment_id = (SELECT s.id FROM segments s WHERE "
        "s.severity = COALESCE(actions.incident_severity, '') AND "
        "s.incident_class = COALESCE(actions.incident_class, '') AND "
        "s.tier = COALESCE(actions.incident_tier, '') AND "
        "s.environment = actions.environment AND s.action = actions.action_type AND "
        "s.proposer_kind = actions.proposer_kind AND s.proposer_id = actions.proposer_id)"
    )
    for table in ("decisions", "executions"):
        op.execute(
            f"UPDATE {table} SET segment_id = (SELECT a.segment_id FROM actions a "
            f"WHERE a.id = {table}.action_id) WHERE {table}.action_id IS NOT NULL"
        )
    op.execute(
        "DELETE FROM segments WHERE proposer_id = '' AND id NOT IN "
        "(SELECT segment_id FROM actions WHERE segment_id IS NOT NULL)"
    )


def downgrade() -> None:
    for (table, name), _columns in reversed(_INDEXES.items()):
        op.drop_index(name, table_name=table)
    op.drop_index("ix_segments_proposer_id", table_name="segments")
    # Back to one segment per key without the proposer: the lowest id of each key wins.
    for table in ("actions", "decisions", "executions"):
        op.execute(
            f"UPDATE {table} SET segment_id = (SELECT MIN(k.id) FROM segments s "
            "JOIN segments k ON k.severity = s.severity AND "
            "k.incident_class = s.incident_class AND k.tier = s.tier AND "
            "k.environment = s.environment AND k.action = s.action AND "
            f"k.proposer_kind = s.proposer_kind WHERE s.id = {table}.segment_id)"
        )
    op.execute(
        "DELETE FROM segments WHERE id NOT IN (SELECT MIN(id) FROM segments GROUP BY "
        "severity, incident_class, tier, environment, action, proposer_kind)"
    )
    new = _unique_name(_NEW_KEY)
    with op.batch_alter_table("segments") as batch:
        batch.drop_constraint(new, type_="unique")
        batch.drop_column("proposer_id")
        batch.create_unique_constraint(op.f(_uq(_OLD_KEY)), list(_OLD_KEY))
