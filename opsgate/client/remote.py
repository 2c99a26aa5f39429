"""`RemoteGate`: the ActionService over the API, returning the same outcome objects as
the local Gate so every command renders the same either way."""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

if TYPE_CHECKING:
    from opsgate.reports.request import ReportRequest

from opsgate.client.http import ApiClient
from opsgate.errors import OpsgateError
from opsgate.gate import ActionDetails, ApproveOutcome, ProposeOutcome
from opsgate.models import (
    Action,
    ActionState,
    Approval,
    AuditEvent,
    Decision,
    Execution,
    Identity,
    Measurement,
    TrustReset,
)


def _model(cls: Any, document: Any) -> Any:
    # Renderers add derived keys (e.g. a measurement's `counted`): keep the model's own.
    if isinstance(document, dict):
        document = {k: v for k, v in document.items() if k in cls.model_fields}
    try:
        return cls.model_validate(document)
    except (ValidationError, TypeError, KeyError) as exc:
        raise OpsgateError(f"the server's answer does not fit ({cls.__name__}): {exc}") from None


def action_from_json(d: dict[str, Any]) -> Action:
    fields = {k: v for k, v in d.items() if k != "action"}
    return _model(Action, {**fields, "action_type": d.get("action")})


def decision_from_json(d: dict[str, Any]) -> Decision:
    return _model(Decision, d)


def approval_from_json(d: dict[str, Any], action_id: str) -> Approval:
    return _model(Approval, {**d, "action_id": action_id})


def event_from_json(d: dict[str, Any]) -> AuditEvent:
    fields = {k: v for k, v in d.items() if k != "at_precise"}
    fields["at"] = d.get("at_precise") or d.get("at")
    return _model(AuditEvent, fields)


def execution_from_json(d: dict[str, Any]) -> Execution:
    return _model(Execution, {k: v for k, v in d.items() if k != "rollback_time"})


def measurement_from_json(d: dict[str, Any], action_id: str) -> Measurement:
    return _model(Measurement, {**d, "action_id": action_id})


def details_from_json(d: dict[str, Any]) -> ActionDetails:
    action = action_from_json(d["action"])
    return ActionDetails(
        action,
        [decision_from_json(x) for x in d.get("decisions", [])],
        [approval_from_json(x, action.id) for x in d.get("approvals", [])],
        [event_from_json(x) for x in d.get("events", [])],
        execution_from_json(d["execution"]) if d.get("execution") else None,
        [measurement_from_json(x, action.id) for x in d.get("measurements", [])],
    )


def _list(answer: Any, what: str) -> list[Any]:
    if not isinstance(answer, list):
        raise OpsgateError(f"the server's {what} answer is not a list")
    return answer


def _path_id(action_id: str) -> str:
    return urllib.parse.quote(action_id, safe="")


class RemoteGate:
    """Gate verbs through `opsgate server`; the server decides who acts."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client

    def whoami(self) -> dict[str, Any]:
        answer = self.client.call("GET", "/whoami")
        if not isinstance(answer, dict):
            raise OpsgateError("the server's whoami answer is not an object")
        return answer

    def propose(self, document: Any, proposer: Identity) -> ProposeOutcome:
        answer = self.client.call("POST", "/actions", document)
        return ProposeOutcome(
            action_from_json(answer["action"]),
            decision_from_json(answer["decision"]),
            existing=bool(answer.get("existing")),
        )

    def queue(self, mine_to_approve: bool = False) -> list[Action]:
        path = "/queue?mine_to_approve=1" if mine_to_approve else "/queue"
        return [action_from_json(a) for a in _list(self.client.call("GET", path), "queue")]

    def report(self, request: ReportRequest, fmt: str) -> str:
        """`opsgate report` built and rendered by the server, in `fmt`."""
        query: list[tuple[str, str]] = [("format", fmt), ("min_runs", str(request.min_runs))]
        for name in ("since", "until", "by", "table", "proposer_kind"):
            value = getattr(request, name)
            if value is not None:
                query.append((name, value))
        query += [("where", pair) for pair in request.where]
        path = f"/reports/{_path_id(request.kind)}?" + urllib.parse.urlencode(query)
        answer = self.client.call("GET", path)
        text = answer.get("text") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            raise OpsgateError("the server's report answer has no text")
        if fmt == "table" and any(not (c.isprintable() or c == "\n") for c in text):
            # Printed as is to a terminal: escape sequences from the wire are not.
            raise OpsgateError("the server's report holds control characters; not shown")
        return text

    def audit_verify(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = self.client.call("POST", "/audit/verify", body)
        if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
            raise OpsgateError("the server's audit verify answer does not fit")
        return answer

    def audit_decisions(self, fmt: str, since: str, until: str | None) -> list[dict[str, Any]]:
        query = [("format", fmt), ("since", since)] + ([("until", until)] if until else [])
        answer = _list(
            self.client.call("GET", "/audit/decisions?" + urllib.parse.urlencode(query)),
            "audit decisions",
        )
        if not all(isinstance(d, dict) for d in answer):
            raise OpsgateError("the server's audit decisions answer does not fit")
        return answer

    def workers(self, show_all: bool) -> dict[str, Any]:
        answer = self.client.call("GET", "/workers?all=1" if show_all else "/workers")
        rows = answer.get("workers") if isinstance(answer, dict) else None
        fits = isinstance(rows, list) and all(
            isinstance(r, dict)
            and {"id", "hostname", "pid", "status", "heartbeat_age_s", "leases"} <= set(r)
            and isinstance(r["heartbeat_age_s"], int | float)
            and isinstance(r["leases"], list)
            and all(isinstance(x, dict) and {"action_id", "target"} <= set(x) for x in r["leases"])
            for r in rows or []
        )
        if not fits or not isinstance(answer.get("lease"), int | float):
            raise OpsgateError("the server's workers answer does not fit")
        return dict(answer)

    def resolve(self, prefix: str) -> str:
        """The full id of the one action the caller may read that starts with `prefix`."""
        query = urllib.parse.urlencode({"prefix": prefix})
        answer = self.client.call("GET", "/resolve?" + query)
        found = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(found, str) or not found.startswith(prefix.strip().upper()):
            raise OpsgateError("the server's resolve answer does not fit")
        return found

    def expire_due(self) -> list[Action]:
        return []  # the server expires what is due before it answers

    def details(self, action_id: str) -> ActionDetails:
        return details_from_json(self.details_document(action_id))

    def details_document(self, action_id: str) -> dict[str, Any]:
        """`show --json` as the server built it: only the server has the catalog that
        plans the steps and masks the params."""
        answer = self.client.call("GET", f"/actions/{_path_id(action_id)}")
        if not isinstance(answer, dict) or not isinstance(answer.get("plan"), dict):
            raise OpsgateError("the server's action answer is not an action document")
        return answer

    def approve(self, action_id: str, approver: Identity, comment: str = "") -> ApproveOutcome:
        answer = self.client.call(
            "POST", f"/actions/{_path_id(action_id)}/approve", {"comment": comment}
        )
        action = action_from_json(answer["action"])
        return ApproveOutcome(
            action,
            [approval_from_json(a, action.id) for a in answer["approvals"]],
            counted=bool(answer["counted"]),
        )

    def reject(self, action_id: str, actor: Identity, reason: str) -> Action:
        return action_from_json(
            self.client.call("POST", f"/actions/{_path_id(action_id)}/reject", {"reason": reason})
        )

    def catalog_document(self) -> dict[str, Any]:
        return dict(self.client.call("GET", "/catalog"))

    def policy_document(self) -> dict[str, Any]:
        return dict(self.client.call("GET", "/policy"))

    def my_actions(self, states: list[ActionState] | None, limit: int) -> list[Action]:
        """What the caller proposed, oldest first."""
        query = [("state", s.value) for s in states or []] + [("limit", str(limit))]
        answer = self.client.call("GET", "/my-actions?" + urllib.parse.urlencode(query))
        return [action_from_json(a) for a in answer]

    def cancel(self, action_id: str, actor: Identity, reason: str = "") -> Action:
        return action_from_json(
            self.client.call("POST", f"/actions/{_path_id(action_id)}/cancel", {"reason": reason})
        )

    def trust_reset(self, proposer: str, action_type: str, reason: str) -> TrustReset:
        """`opsgate trust reset` on the server, as the token's principal."""
        answer = self.client.call(
            "POST",
            "/trust/reset",
            {"proposer": proposer, "action_type": action_type, "reason": reason},
        )
        if not isinstance(answer, dict):
            raise OpsgateError("the server's trust reset answer is not an object")
        return trust_reset_from_json(answer)


def trust_reset_from_json(d: dict[str, Any]) -> TrustReset:
    return _model(
        TrustReset,
        {
            "id": d.get("id"),
            "proposer_id": d.get("proposer"),
            "action_type": d.get("action_type"),
            "reset_by": d.get("reset_by"),
            "reason": d.get("reason"),
            "at": d.get("at_precise") or d.get("at"),
        },
    )


__all__ = ["RemoteGate", "details_from_json"]
