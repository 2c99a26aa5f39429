"""Stored decisions in OPA's decision-log shape, so existing OPA log pipelines ingest them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC
from typing import Any

from opsgate.models import Decision
from opsgate.policies.engine import APPROVAL_RULE, AUTHZ_RULE, DECISION_RULE

MASKED = "***"
# The revision opsgate computes for a bundle it loads or pushes (engine.bundle_revision).
_OWN_REVISION = re.compile(r"sha256:[0-9a-f]{64}")
_UNKNOWN = "external:unknown"  # OPA in external mode reported no provenance


def opa_bundles(revision: str, engine: str) -> tuple[dict[str, Any], str | None]:
    """(`bundles`, legacy `revision`) as OPA's decision log has them, from a stored
    revision: opsgate's own bundle (embedded, or pushed to OPA) is the bundle `opsgate`;
    OPA in external mode stores `name:rev,name:rev` (one entry per bundle), a legacy
    single revision without a name, or nothing known."""
    if engine == "embedded" or _OWN_REVISION.fullmatch(revision):
        return {"opsgate": {"revision": revision}}, None
    if not revision or revision == _UNKNOWN:
        return {}, None
    if ":" not in revision:
        return {}, revision  # OPA's legacy single-bundle `revision` field
    bundles: dict[str, Any] = {}
    for part in revision.split(","):
        name, _, rev = part.partition(":")
        bundles[name] = {"revision": rev}
    return bundles, None


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
    path = {"approval": APPROVAL_RULE, "authz": AUTHZ_RULE}.get(decision.phase, DECISION_RULE)
    event: dict[str, Any] = {
        "labels": {"app": "opsgate", "version": app_version},
        "decision_id": decision.id,
        "path": path,
        "input": decision.input,
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
    bundles, legacy = opa_bundles(decision.bundle_revision, decision.engine)
    if bundles:
        event["bundles"] = bundles
    if legacy is not None:
        event["revision"] = legacy
    if decision.result is not None:
        event["result"] = decision.result
    if decision.error:
        event["error"] = {"code": "opsgate_engine_error", "message": decision.error}
    masked = masked_pointers(decision.input)
    if masked:
        event["masked"] = masked
    return event
