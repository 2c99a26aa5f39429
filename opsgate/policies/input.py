"""Build the policy input document (docs/design.md, "The policy contract"); pure, no I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from opsgate.models import ActionType, Identity, Incident, ParamSpec, VerificationSpec
from opsgate.preconditions import PreconditionResult
from opsgate.verification.plan import verification_differences, verification_document


def rfc3339(at: datetime) -> str:
    """UTC with a numeric offset: regopy's time.parse_rfc3339_ns rejects a `Z` suffix."""
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def epoch_ns(at: datetime) -> int:
    return int(at.timestamp()) * 1_000_000_000 + at.microsecond * 1000


def mask_params(params: Mapping[str, Any], specs: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """Secret params are masked everywhere they are shown, policy input included."""
    return {k: ("***" if specs.get(k) and specs[k].secret else v) for k, v in params.items()}


def verification_input(default: VerificationSpec, proposed: VerificationSpec) -> dict[str, Any]:
    """Counts (the original contract), the whole plan, whether the proposal replaced the
    action type's default (`custom`) and, if so, how (`differences`; `weakened` lists
    the codes of those that make it easier to pass or slower to catch harm)."""
    differences = verification_differences(default, proposed)
    return {
        "defined": proposed.defined,
        "signals": len(proposed.signals),
        "stop_conditions": len(proposed.stop_conditions),
        "custom": proposed != default,
        "plan": verification_document(proposed),
        "differences": [d.as_input() for d in differences],
        "weakened": sorted({d.code for d in differences if d.weakens}),
    }


def build_input(
    *,
    action_type: ActionType,
    target: str,
    environment: str,
    params: Mapping[str, Any],
    reason: str,
    spec_hash: str,
    proposer: Identity,
    incident: Incident,
    verification: VerificationSpec,
    preconditions: Sequence[PreconditionResult],
    now: datetime,
    phase: Literal["propose", "execute"],
    active_on_target: int,
    approver: Identity | None = None,
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "action": {
            "type": action_type.name,
            "target": target,
            "environment": environment,
            "params": mask_params(params, action_type.params),
            # Which params were masked, by flag: a decision-log export marks exactly these.
            "secret_params": sorted(n for n, p in action_type.params.items() if p.secret),
            "risk": action_type.risk,
            "reversible": action_type.reversible,
            "spec_hash": spec_hash,
            "reason": reason,
        },
        "proposer": {"id": proposer.id, "kind": proposer.kind},
        "incident": {
            "id": incident.id,
            "severity": incident.severity,
            "class": incident.class_,
            "tier": incident.tier,
        },
        "verification": verification_input(action_type.verification, verification),
        "preconditions": [p.as_input() for p in preconditions],
        "context": {
            "now": rfc3339(now),
            "now_ns": epoch_ns(now),
            "phase": phase,
            "active_on_target": active_on_target,
        },
    }
    if approver is not None:
        document["approver"] = {"id": approver.id, "kind": approver.kind}
    return document
