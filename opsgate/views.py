"""JSON views of actions, decisions, approvals, events, executions and measurements:
the one shape every adapter (CLI --json, MCP tools, the HTTP API) answers with.

Params are masked here, so no adapter can forget to: which params are secret comes from
the action's own creation event, else today's catalog, else every value is masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from opsgate.models import (
    Action,
    Approval,
    AuditEvent,
    Decision,
    Execution,
    Measurement,
    TrustReset,
)

if TYPE_CHECKING:  # types only: listing and queue load no catalog, gate or engine
    from opsgate.catalog import Catalog
    from opsgate.gate import ActionDetails


def ts(at: datetime | None) -> str | None:
    """UTC RFC 3339 with a Z, for people and tools alike."""
    if at is None:
        return None
    return at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def secret_names(
    action: Action, catalog: Catalog | None, events: Sequence[AuditEvent] = ()
) -> set[str] | None:
    """The params that were secret when the action was proposed (its creation event
    records them); else what today's catalog says; None when nobody can tell."""
    from opsgate.gate import SECRET_PARAMS_KEY

    for event in events:
        if event.action_id == action.id and event.from_state == "proposed":
            recorded = event.data.get(SECRET_PARAMS_KEY)
            if isinstance(recorded, list):
                return {str(name) for name in recorded}
            break
    if catalog is not None and action.action_type in catalog.types:
        specs = catalog.types[action.action_type].params
        return {name for name, spec in specs.items() if spec.secret}
    return None


def masked(
    action: Action, catalog: Catalog | None, events: Sequence[AuditEvent] = ()
) -> dict[str, Any]:
    secret = secret_names(action, catalog, events)
    if secret is None:  # which params are secret is unknown: show none of the values
        return {name: "***" for name in action.params}
    return {k: ("***" if k in secret else v) for k, v in action.params.items()}


def action_json(
    action: Action, catalog: Catalog | None = None, events: Sequence[AuditEvent] = ()
) -> dict[str, Any]:
    return {
        "id": action.id,
        "action": action.action_type,
        "target": action.target,
        "environment": action.environment,
        "params": masked(action, catalog, events),
        "reason": action.reason,
        "incident": action.incident.model_dump(by_alias=True),
        "risk": action.risk,
        "reversible": action.reversible,
        "spec_hash": action.spec_hash,
        "proposer": action.proposer.model_dump(),
        "state": action.state.value,
        "required_approvals": action.required_approvals,
        "approver_roles": list(action.approver_roles),
        "idempotency_key": action.idempotency_key,
        "created_at": ts(action.created_at),
        "updated_at": ts(action.updated_at),
        "expires_at": ts(action.expires_at),
        "verification": action.verification.model_dump(mode="json", by_alias=True),
    }


def decision_json(decision: Decision) -> dict[str, Any]:
    return {
        "id": decision.id,
        "action_id": decision.action_id,
        "phase": decision.phase,
        "allow": decision.allow,
        "deny": [d.model_dump() for d in decision.deny],
        "required_approvals": decision.required_approvals,
        "approver_roles": list(decision.approver_roles),
        "engine": decision.engine,
        "bundle_revision": decision.bundle_revision,
        "decided_at": ts(decision.decided_at),
        "duration_ms": round(decision.duration_ms, 3),
        "input": decision.input,
        "result": decision.result,
        "error": decision.error,
        "shadow": decision.shadow,
    }


def approval_json(approval: Approval) -> dict[str, Any]:
    return {
        "id": approval.id,
        "approver": approval.approver.model_dump(),
        "spec_hash": approval.spec_hash,
        "comment": approval.comment,
        "created_at": ts(approval.created_at),
    }


def trust_reset_json(record: TrustReset) -> dict[str, Any]:
    """`opsgate trust reset --json`; the API adds `at_precise` (what the client reads)."""
    return {
        "id": record.id,
        "proposer": record.proposer_id,
        "action_type": record.action_type,
        "reset_by": record.reset_by,
        "reason": record.reason,
        "at": ts(record.at),
    }


def event_json(event: AuditEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "id": event.id,
        "at": ts(event.at),
        "at_precise": event.at.astimezone(UTC).isoformat(timespec="microseconds"),
        "action_id": event.action_id,
        "kind": event.kind,
        "actor": event.actor,
        "from_state": event.from_state,
        "to_state": event.to_state,
        "data": event.data,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }


def execution_json(execution: Execution) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for name, value in execution.model_dump(mode="python").items():
        document[name] = ts(value) if isinstance(value, datetime) else value
    document["rollback_time"] = execution.rollback_time
    return document


def measurement_json(measurement: Measurement) -> dict[str, Any]:
    return {
        "phase": measurement.phase,
        "name": measurement.name,
        "kind": measurement.kind,
        "at": measurement.at.astimezone(UTC).isoformat(timespec="milliseconds"),
        "value": measurement.value,
        "outcome": measurement.outcome,
        "detail": measurement.detail,
        "counted": measurement.not_counted is None,
        "not_counted": measurement.not_counted,
    }


def plan_of(details: ActionDetails, catalog: Catalog | None) -> dict[str, Any]:
    from opsgate.executor.plan import action_plan

    action = details.action
    action_type = catalog.types.get(action.action_type) if catalog is not None else None
    captured = details.execution.captured if details.execution is not None else {}
    shown = masked(action, catalog, details.events)  # as recorded at proposal
    return action_plan(action, action_type, captured, shown_params=shown)


def details_json(details: ActionDetails, catalog: Catalog | None) -> dict[str, Any]:
    return {
        "action": action_json(details.action, catalog, details.events),
        "plan": plan_of(details, catalog),
        "decisions": [decision_json(d) for d in details.decisions],
        "approvals": [approval_json(a) for a in details.approvals],
        "execution": execution_json(details.execution) if details.execution else None,
        "measurements": [measurement_json(m) for m in details.measurements],
        "events": [event_json(e) for e in details.events],
    }


def catalog_json(catalog: Catalog) -> dict[str, Any]:
    """The catalog as agents and API clients read it, with the revision proposals hash."""
    from opsgate.catalog import action_type_json

    return {
        "catalog_revision": catalog.revision,
        "action_types": [action_type_json(t) for t in catalog],
    }


def worker_rows(store: Any, lease: float, show_all: bool, now: datetime) -> list[dict[str, Any]]:
    """`opsgate workers --json`: the same rows locally and from the server."""
    held: dict[str, list[Execution]] = {}
    for execution in store.unfinished_executions():
        held.setdefault(execution.worker_id, []).append(execution)
    rows: list[dict[str, Any]] = []
    for info in store.list_workers():
        age = (now - info.heartbeat_at).total_seconds()
        status = info.status(now, lease)
        if status == "stopped" and not show_all and not held.get(info.id):
            continue
        leases = held.get(info.id, [])
        rows.append(
            {
                "id": info.id,
                "hostname": info.hostname,
                "pid": info.pid,
                "status": status,
                "started_at": ts(info.started_at),
                "heartbeat_at": ts(info.heartbeat_at),
                "heartbeat_age_s": round(age, 1),
                "leases": [
                    {
                        "action_id": e.action_id,
                        "target": f"{e.target} ({e.environment})",
                        "lease_expires_at": ts(e.lease_expires_at),
                    }
                    for e in leases
                ],
            }
        )
    return rows
