"""Which audit events are announced, and what a notification says.

The store calls `outbox_entry` from inside the transaction that appends the event, so a
notification exists exactly when its state change was committed.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from ulid import ULID

if TYPE_CHECKING:
    from opsgate.models import Action, AuditEvent

# Audit kind -> the event name receivers see. Everything else changes nothing an approver
# or on-call person has to act on.
NOTIFIED_KINDS: dict[str, str] = {
    "action.pending_approval": "pending_approval",
    "action.approved": "approved",
    "action.blocked_at_execution": "blocked_at_execution",
    "action.rolled_back": "rolled_back",
    "action.rollback_failed": "rollback_failed",
}

SCHEMA_VERSION = 1


def _ts(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def action_summary(action: Action) -> dict[str, Any]:
    """What a receiver needs to route and show the action; never its params (secrets)."""
    return {
        "id": action.id,
        "type": action.action_type,
        "target": action.target,
        "environment": action.environment,
        "state": action.state.value,
        "risk": action.risk,
        "reason": action.reason,
        "incident": action.incident.id,
        "severity": action.incident.severity,
        "proposer": action.proposer.id,
        "proposer_kind": action.proposer.kind,
        "required_approvals": action.required_approvals,
        "expires_at": _ts(action.expires_at),
    }


def outbox_entry(event: AuditEvent, action: Action | None) -> dict[str, Any] | None:
    """The outbox row for an event, or None when the event is not announced."""
    name = NOTIFIED_KINDS.get(event.kind)
    if name is None:
        return None
    delivery_id = str(ULID())
    payload: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "delivery_id": delivery_id,
        "event": name,
        "event_id": event.id,
        "audit_seq": event.seq,
        "at": _ts(event.at),
        "actor": event.actor,
        "action": action_summary(action) if action is not None else None,
    }
    return {
        "id": delivery_id,
        "event_id": event.id,
        "kind": name,
        "action_id": event.action_id,
        "payload": payload,
        "created_at": event.at,
        "next_attempt_at": event.at,
        "attempts": 0,
        "delivered_to": [],
        "lease_owner": None,
        "lease_until": None,
        "delivered_at": None,
        "failed_at": None,
        "last_error": None,
    }
