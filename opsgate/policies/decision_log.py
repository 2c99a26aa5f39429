"""Stored decisions in OPA's decision-log shape, so existing OPA log pipelines ingest them."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC
from typing import Any

from opsgate.models import Decision
from opsgate.policies.engine import APPROVAL_RULE, DECISION_RULE

MASKED = "***"


def masked_pointers(document: Mapping[str, Any]) -> list[str]:
    """JSON pointers of the input values opsgate masked (secret params): by the input's
    `secret_params` flag list; only decisions stored before it existed are judged by value."""
    action = document.get("action", {})
    params = action.get("params", {}) if isinstance(action, Mapping) else {}
    if not isinstance(params, Mapping):
        return []
    flagged = action.get("secret_params")
    if isinstance(flagged, list):
        return [f"/input/action/params/{name}" for name in params if name in flagged]
    return [f"/input/action/params/{name}" for name, value in params.items() if value == MASKED]


def opa_decision_log(decision: Decision, *, app_version: str) -> dict[str, Any]:
    """One decision as an OPA decision-log event (decision_id, path, input, result,
    bundle revision, timestamp, masked), plus an `opsgate` object with our own keys."""
    path = APPROVAL_RULE if decision.phase == "approval" else DECISION_RULE
    event: dict[str, Any] = {
        "labels": {"app": "opsgate", "version": app_version},
        "decision_id": decision.id,
        "path": path,
        "input": decision.input,
        "bundles": {"opsgate": {"revision": decision.bundle_revision}},
        "timestamp": decision.decided_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "metrics": {"timer_server_handler_ns": int(decision.duration_ms * 1_000_000)},
        "opsgate": {
            "action_id": decision.action_id,
            "phase": decision.phase,
            "engine": decision.engine,
            "allow": decision.allow,
            "deny_codes": decision.deny_codes,
        },
    }
    if decision.result is not None:
        event["result"] = decision.result
    if decision.error:
        event["error"] = {"code": "opsgate_engine_error", "message": decision.error}
    masked = masked_pointers(decision.input)
    if masked:
        event["masked"] = masked
    return event
