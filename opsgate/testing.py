"""Test helpers for opsgate and its users: model factories, and the in-memory store
(opsgate.store.memory) re-exported for tests written before it moved."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from ulid import ULID

from opsgate.audit import AuditDraft
from opsgate.models import (
    Action,
    ActionState,
    Approval,
    Decision,
    Execution,
    Identity,
    Measurement,
)
from opsgate.shared import utcnow
from opsgate.store.memory import MemoryStore, MemoryTx

__all__ = [
    "MemoryStore",
    "MemoryTx",
    "make_action",
    "make_approval",
    "make_decision",
    "make_draft",
    "make_execution",
    "make_measurement",
    "new_id",
    "utcnow",
]


def new_id() -> str:
    return str(ULID())


# --- factories ---------------------------------------------------------------------------


def make_action(**overrides: Any) -> Action:
    """A valid pending_approval scale_deployment action; any field can be overridden."""
    now = utcnow()
    fields: dict[str, Any] = {
        "id": new_id(),
        "action_type": "scale_deployment",
        "target": "checkout",
        "environment": "prod",
        "params": {"deployment": "checkout", "replicas": 6},
        "reason": "p99 latency over SLO since 14:02",
        "incident": {"id": "INC-42", "severity": "sev2", "class": "capacity", "tier": "critical"},
        "verification": {
            "interval": 10,
            "hold": 120,
            "timeout": 600,
            "signals": [
                {"name": "error_rate", "query": "sum(rate(errors[1m]))", "pass": {"max": 0.01}}
            ],
            "stop_conditions": [
                {"name": "error_spike", "query": "sum(rate(errors[1m]))", "halt": {"min": 0.2}}
            ],
        },
        "risk": "medium",
        "reversible": True,
        "spec_hash": "sha256:" + "ab" * 32,
        "proposer": Identity(id="alice", kind="human"),
        "state": ActionState.PENDING_APPROVAL,
        "required_approvals": 1,
        "approver_roles": ("sre",),
        "idempotency_key": None,
        "created_at": now,
        "updated_at": now,
        "expires_at": now + timedelta(hours=1),
    }
    fields.update(overrides)
    return Action.model_validate(fields)


def make_decision(action_id: str | None = None, **overrides: Any) -> Decision:
    """An allowing propose-phase decision for `action_id`."""
    fields: dict[str, Any] = {
        "id": new_id(),
        "action_id": action_id,
        "phase": "propose",
        "allow": True,
        "deny": (),
        "required_approvals": 1,
        "approver_roles": ("sre",),
        "engine": "embedded",
        "bundle_revision": "sha256:" + "cd" * 32,
        "input": {"action": {"type": "scale_deployment", "target": "checkout"}},
        "result": {"allow": True, "deny": [], "required_approvals": 1, "approver_roles": ["sre"]},
        "error": None,
        "decided_at": utcnow(),
        "duration_ms": 1.5,
    }
    fields.update(overrides)
    return Decision.model_validate(fields)


def make_approval(action_id: str, **overrides: Any) -> Approval:
    """An approval of `action_id` by bob (a human)."""
    fields: dict[str, Any] = {
        "id": new_id(),
        "action_id": action_id,
        "approver": Identity(id="bob", kind="human"),
        "spec_hash": "sha256:" + "ab" * 32,
        "comment": "",
        "created_at": utcnow(),
    }
    fields.update(overrides)
    return Approval.model_validate(fields)


def make_draft(action_id: str | None = None, **overrides: Any) -> AuditDraft:
    """An audit event draft, ready for `StoreTx.append_audit` or `audit.seal`."""
    fields: dict[str, Any] = {
        "id": new_id(),
        "at": utcnow(),
        "action_id": action_id,
        "kind": "action.pending_approval",
        "actor": "alice",
        "from_state": "proposed",
        "to_state": "pending_approval",
        "data": {"deny": []},
    }
    fields.update(overrides)
    return AuditDraft(**fields)


def make_execution(action_id: str, **overrides: Any) -> Execution:
    """A fresh claim of `action_id` on checkout (prod) by worker w1, leased for a minute."""
    now = utcnow()
    fields: dict[str, Any] = {
        "action_id": action_id,
        "target": "checkout",
        "environment": "prod",
        "worker_id": "w1",
        "claimed_at": now,
        "lease_expires_at": now + timedelta(minutes=1),
        "heartbeat_at": now,
    }
    fields.update(overrides)
    return Execution.model_validate(fields)


def make_measurement(action_id: str, **overrides: Any) -> Measurement:
    """A passing error_rate signal measurement taken during verification."""
    fields: dict[str, Any] = {
        "action_id": action_id,
        "phase": "verify",
        "name": "error_rate",
        "kind": "signal",
        "at": utcnow(),
        "value": 0.002,
        "outcome": "pass",
        "detail": "",
    }
    fields.update(overrides)
    return Measurement.model_validate(fields)
