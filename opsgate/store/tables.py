"""SQLAlchemy Core tables for the store; the migrations in `migrations/versions` match them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator, TypeEngine

# Explicit names keep constraints identical across SQLite, PostgreSQL and the migrations.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC; always returns timezone-aware UTC datetimes (naive input is taken as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        # SQLite's DATETIME text has no offset; a fixed-width UTC string also sorts correctly.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json(none_as_null: bool = False) -> TypeEngine[Any]:
    return JSON(none_as_null=none_as_null).with_variant(
        JSONB(none_as_null=none_as_null), "postgresql"
    )


BIG_INTEGER: TypeEngine[int] = BigInteger().with_variant(Integer(), "sqlite")

# Audit data is hashed: PostgreSQL `json` keeps the text as written, whereas JSONB would
# rewrite numbers (1e16 comes back as the integer 10000000000000000) and break the chain.
AUDIT_JSON: TypeEngine[Any] = JSON()

actions = Table(
    "actions",
    metadata,
    Column("id", String, primary_key=True),
    Column("action_type", String, nullable=False),
    Column("target", String, nullable=False),
    Column("environment", String, nullable=False),
    Column("params", _json(), nullable=False),
    Column("reason", Text, nullable=False),
    Column("incident_id", String, nullable=True),
    Column("incident_severity", String, nullable=True),
    Column("incident_class", String, nullable=True),
    Column("incident_tier", String, nullable=True),
    Column("verification", _json(), nullable=False),
    Column("risk", String, nullable=False),
    Column("reversible", Boolean, nullable=False),
    Column("spec_hash", String, nullable=False),
    Column("proposer_id", String, nullable=False),
    Column("proposer_kind", String, nullable=False),
    Column("state", String, nullable=False),
    Column("required_approvals", Integer, nullable=False),
    Column("approver_roles", _json(), nullable=False),
    Column("idempotency_key", String, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("approved_at", UTCDateTime, nullable=True),
    # The report segment (severity, class, tier, environment, action, proposer kind) as
    # one small integer: reports group by it from covering indexes, not by six strings.
    Column("segment_id", Integer, nullable=True),
    # Scoped to the proposer: one proposer's key never finds, nor blocks, another's action.
    UniqueConstraint("proposer_id", "idempotency_key"),
    Index("ix_actions_state_created_at", "state", "created_at"),
    Index("ix_actions_target_environment_state", "target", "environment", "state"),
    Index("ix_actions_proposer_id", "proposer_id"),
    Index("ix_actions_report", "created_at", "segment_id", "state", "approved_at"),
    # One proposer's facts (its segments) in a window: the track record's approvals.
    Index("ix_actions_segment", "segment_id", "created_at", "state", "approved_at"),
)

decisions = Table(
    "decisions",
    metadata,
    Column("id", String, primary_key=True),
    Column("action_id", String, ForeignKey("actions.id"), nullable=True),
    Column("phase", String, nullable=False),
    Column("allow", Boolean, nullable=False),
    Column("deny", _json(), nullable=False),  # [{"code": ..., "message": ...}]
    Column("deny_codes", _json(), nullable=False),  # ["code", ...] for reports
    Column("required_approvals", Integer, nullable=False),
    Column("approver_roles", _json(), nullable=False),
    Column("engine", String, nullable=False),
    Column("bundle_revision", String, nullable=False),
    Column("input", _json(), nullable=False),
    Column("result", _json(none_as_null=True), nullable=True),
    Column("error", Text, nullable=True),
    Column("decided_at", UTCDateTime, nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("segment_id", Integer, nullable=True),  # the action's, copied for reports
    # deny_codes as JSON text (NULL when allowed): the few distinct code lists are
    # grouped on from the covering index, so reports never parse JSON per row.
    Column("deny_key", String, nullable=True),
    Column("shadow", _json(none_as_null=True), nullable=True),  # the shadow bundle's verdict
    Index("ix_decisions_action_id_decided_at", "action_id", "decided_at"),
    Index("ix_decisions_decided_at", "decided_at"),
    Index("ix_decisions_report", "phase", "decided_at", "segment_id", "allow", "deny_key"),
    Index("ix_decisions_segment", "segment_id", "phase", "decided_at", "allow", "deny_key"),
)

approvals = Table(
    "approvals",
    metadata,
    Column("id", String, primary_key=True),
    Column("action_id", String, ForeignKey("actions.id"), nullable=False),
    Column("approver_id", String, nullable=False),
    Column("approver_kind", String, nullable=False),
    Column("spec_hash", String, nullable=False),
    Column("comment", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    UniqueConstraint("action_id", "approver_id"),
)

audit_events = Table(
    "audit_events",
    metadata,
    # INTEGER on SQLite makes seq the rowid: one B-tree less to write per event.
    Column("seq", BIG_INTEGER, primary_key=True, autoincrement=False),
    Column("id", String, nullable=False),
    Column("at", UTCDateTime, nullable=False),
    # No foreign key: the log records events about anything and must outlive any row.
    Column("action_id", String, nullable=True),
    Column("kind", String, nullable=False),
    Column("actor", String, nullable=False),
    Column("from_state", String, nullable=True),
    Column("to_state", String, nullable=True),
    Column("data", AUDIT_JSON, nullable=False),
    Column("prev_hash", String, nullable=False),
    Column("hash", String, nullable=False),
    Index("ix_audit_events_action_id", "action_id"),
)

# One row (id=1): the newest seq and hash. Appenders lock it, which serialises the chain.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BIG_INTEGER, nullable=False),
    Column("hash", String, nullable=False),
    CheckConstraint("id = 1", name="single_row"),
)

# Signed heads. No link to audit_events: a checkpoint must outlive a cut of the chain so
# that the cut shows.
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("seq", BIG_INTEGER, nullable=False),
    Column("hash", String, nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("key_id", String, nullable=False),
    Column("signature", String, nullable=False),
    Index("ix_audit_checkpoints_seq", "seq"),
)

executions = Table(
    "executions",
    metadata,
    Column("action_id", String, ForeignKey("actions.id"), primary_key=True),
    Column("target", String, nullable=False),
    Column("environment", String, nullable=False),
    Column("worker_id", String, nullable=False),
    Column("claimed_at", UTCDateTime, nullable=False),
    Column("lease_expires_at", UTCDateTime, nullable=False),
    Column("heartbeat_at", UTCDateTime, nullable=False),
    Column("captured", _json(), nullable=False),
    Column("baseline", _json(none_as_null=True), nullable=True),
    Column("capture_output", Text, nullable=False),
    Column("run_started_at", UTCDateTime, nullable=True),
    Column("run_finished_at", UTCDateTime, nullable=True),
    Column("run_exit_code", Integer, nullable=True),
    Column("run_output", Text, nullable=False),
    Column("run_error", Text, nullable=True),
    Column("verify_started_at", UTCDateTime, nullable=True),
    Column("verify_state", _json(none_as_null=True), nullable=True),
    Column("outcome", String, nullable=True),
    Column("reason", Text, nullable=False),
    Column("trigger_name", String, nullable=True),
    Column("trigger_kind", String, nullable=True),
    Column("trigger_value", Float, nullable=True),
    Column("rollback_decided_at", UTCDateTime, nullable=True),
    Column("rollback_requested_by", String, nullable=True),
    Column("undo_started_at", UTCDateTime, nullable=True),
    Column("undo_finished_at", UTCDateTime, nullable=True),
    Column("undo_exit_code", Integer, nullable=True),
    Column("undo_output", Text, nullable=False),
    Column("undo_error", Text, nullable=True),
    Column("rollback_verify_state", _json(none_as_null=True), nullable=True),
    Column("rollback_verified_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("recovered_from", String, nullable=True),
    Column("segment_id", Integer, nullable=True),  # the action's, copied for reports
    Index("ix_executions_worker_id", "worker_id"),
    Index("ix_executions_lease_expires_at", "lease_expires_at"),
    # Report windows: runs started, rollbacks decided (covering what reports read).
    Index("ix_executions_report", "run_started_at", "segment_id", "outcome", "trigger_name"),
    Index(
        "ix_executions_rollbacks",
        "rollback_decided_at",
        "segment_id",
        "rollback_verified_at",
    ),
    # The same, led by segment: one proposer's runs, rollbacks and run history.
    Index("ix_executions_segment_runs", "segment_id", "run_started_at", "outcome", "trigger_name"),
    Index(
        "ix_executions_segment_finished",
        "segment_id",
        "finished_at",
        "outcome",
        "rollback_decided_at",
        "rollback_verified_at",
    ),
    Index(
        "ix_executions_segment_rollbacks",
        "segment_id",
        "rollback_decided_at",
        "rollback_verified_at",
        "finished_at",
        "rollback_requested_by",
    ),
)

# At most one unfinished execution per target: the database, not a check-then-insert in
# code, is what makes two workers unable to touch one target at the same time.
RUNNING_ON_TARGET_INDEX = "ix_executions_target_environment"
Index(
    RUNNING_ON_TARGET_INDEX,
    executions.c.target,
    executions.c.environment,
    unique=True,
    sqlite_where=executions.c.finished_at.is_(None),
    postgresql_where=executions.c.finished_at.is_(None),
)

# One row per distinct report segment; '' stands for "not given" so the unique
# constraint holds (NULLs would never be equal).
segments = Table(
    "segments",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("severity", String, nullable=False),
    Column("incident_class", String, nullable=False),
    Column("tier", String, nullable=False),
    Column("environment", String, nullable=False),
    Column("action", String, nullable=False),
    Column("proposer_kind", String, nullable=False),
    # The proposer is part of the segment so its track record, read inside every
    # decision, is a range count over segment-led indexes, not a join to its actions.
    Column("proposer_id", String, nullable=False),
    UniqueConstraint(
        "severity",
        "incident_class",
        "tier",
        "environment",
        "action",
        "proposer_kind",
        "proposer_id",
    ),
    Index("ix_segments_proposer_id", "proposer_id"),
)

# Shadow verdicts are rare next to all decisions: the report finds them without a scan.
Index(
    "ix_decisions_shadow",
    decisions.c.decided_at,
    sqlite_where=decisions.c.shadow.is_not(None),
    postgresql_where=decisions.c.shadow.is_not(None),
)

measurements = Table(
    "measurements",
    metadata,
    # INTEGER on SQLite makes id the rowid, which SQLite assigns in insertion order.
    Column("id", BIG_INTEGER, primary_key=True, autoincrement=True),
    Column("action_id", String, ForeignKey("actions.id"), nullable=False),
    Column("phase", String, nullable=False),
    Column("name", String, nullable=False),
    Column("kind", String, nullable=False),
    Column("at", UTCDateTime, nullable=False),
    # ±inf round-trips on both (SQLite REAL, PostgreSQL float8); SQLite turns NaN into NULL.
    Column("value", Float, nullable=True),
    Column("outcome", String, nullable=False),
    Column("detail", Text, nullable=False),
    # NULL: the measurement counted; else why not (`pre_change`, `settling`).
    Column("not_counted", String, nullable=True),
    Index("ix_measurements_action_id_id", "action_id", "id"),
)

workers = Table(
    "workers",
    metadata,
    Column("id", String, primary_key=True),
    Column("hostname", String, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("heartbeat_at", UTCDateTime, nullable=False),
    Column("stopped_at", UTCDateTime, nullable=True),
)

# `opsgate trust reset`: a human lifts `trust_revoked` for one proposer and action type.
# Read once per decision (the newest for the pair), hence the index.
trust_resets = Table(
    "trust_resets",
    metadata,
    Column("id", String, primary_key=True),
    Column("proposer_id", String, nullable=False),
    Column("action_type", String, nullable=False),
    Column("reset_by", String, nullable=False),
    Column("reason", Text, nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Index("ix_trust_resets_proposer_id_action_type_at", "proposer_id", "action_type", "at"),
)

# The track record's summary (opsgate/store/track_summary.py): per proposer, action type
# ('' for all), environment ('' for all), UTC day or block of days (first day, as days
# since 1970-01-01) and deny code
# ('' but for `with_code`), the counts a decision reads; written in the transactions that
# write the facts they count.
track_record_days = Table(
    "track_record_days",
    metadata,
    Column("proposer_id", String, primary_key=True),
    Column("action_type", String, primary_key=True),
    Column("environment", String, primary_key=True),
    Column("span", Integer, primary_key=True, autoincrement=False),  # 1 or BLOCK days
    Column("day", Integer, primary_key=True, autoincrement=False),  # the span's first
    Column("code", String, primary_key=True),
    *(
        Column(name, Integer, nullable=False, server_default="0")
        for name in (
            "proposals",
            "blocked",
            "with_code",
            "approved",
            "rejected",
            "executed",
            "finished",
            "verified_passes",
            "failed_verifications",
            "stop_conditions",
            "automatic_rollbacks",
            "rollbacks_failed",
        )
    ),
)

# ... and when the proposer's runs of a type in an environment last ended, and how.
track_record_latest = Table(
    "track_record_latest",
    metadata,
    Column("proposer_id", String, primary_key=True),
    Column("action_type", String, primary_key=True),
    Column("environment", String, primary_key=True),
    Column("last_finished", UTCDateTime, nullable=True),
    Column("last_failed_or_rolled_back", UTCDateTime, nullable=True),
    Column("last_rolled_back", UTCDateTime, nullable=True),
    Column("last_rollback_failed", UTCDateTime, nullable=True),
)

# Opaque API tokens for `opsgate server`: the secret itself is never stored, only its hash.
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", String, primary_key=True),
    Column("principal", String, nullable=False),
    Column("kind", String, nullable=False),
    Column("groups", _json(), nullable=False),
    Column("secret_hash", String, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("created_by", String, nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("revoked_by", String, nullable=True),
)

# Notifications waiting to be delivered, written in the transaction of the state change
# they announce (a transactional outbox): a crash can lose neither the change's
# notification nor announce a change that was rolled back. A row is leased while it is
# being delivered, so a server that dies mid-delivery hands it to the next one.
outbox = Table(
    "outbox",
    metadata,
    Column("id", String, primary_key=True),  # the delivery id receivers deduplicate on
    Column("event_id", String, nullable=False),
    Column("kind", String, nullable=False),
    Column("action_id", String, nullable=True),
    Column("payload", _json(), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("attempts", Integer, nullable=False),
    # The sinks (webhook, slack) that already took it: a retry skips them.
    Column("delivered_to", _json(), nullable=False),
    Column("lease_owner", String, nullable=True),
    Column("lease_until", UTCDateTime, nullable=True),
    Column("delivered_at", UTCDateTime, nullable=True),
    Column("failed_at", UTCDateTime, nullable=True),  # gave up after the last retry
    Column("last_error", Text, nullable=True),
    Index("ix_outbox_next_attempt_at", "next_attempt_at"),
)
