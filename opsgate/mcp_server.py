"""`opsgate mcp`: AI agents read the catalog, propose, follow and learn why, over MCP.

No tool approves, rejects, runs, rolls back or cancels: those stay with humans.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import anyio.to_thread
from mcp import types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError

from opsgate import __version__
from opsgate.app import App
from opsgate.catalog import Catalog
from opsgate.errors import ConfigError, InvalidInput, NotFound, OpsgateError
from opsgate.gate import ActionDetails, Gate, ProposeOutcome, action_details
from opsgate.models import (
    MAX_REASON_LENGTH,
    NAME_PATTERN,
    TARGET_PATTERN,
    Action,
    ActionState,
    AuditEvent,
    Decision,
    Identity,
)
from opsgate.policies.engine import bundle_revision
from opsgate.store.base import StoreError
from opsgate.trust import TRUST_REVOKED
from opsgate.views import (
    action_json,
    approval_json,
    catalog_json,
    decision_json,
    execution_json,
    measurement_json,
    plan_of,
    ts,
)

log = logging.getLogger(__name__)

AGENT_ID_ENV = "OPSGATE_AGENT_ID"
DEFAULT_AGENT_ID = "sre-agent"
AGENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")
CATALOG_URI = "opsgate://catalog"
POLICY_REVISION_URI = "opsgate://policy/revision"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

DEFAULT_MEASUREMENTS = 20
MAX_MEASUREMENTS = 500
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 200
# Store.list_actions is oldest first; newest first means reading this many and keeping the tail.
LIST_SCAN = 5000
OUTPUT_TAIL = 2000  # characters of run/undo output an agent sees; `opsgate show` has all of it

PROPOSAL_FIELDS = ("action", "target", "environment", "params", "reason", "incident")
PROPOSAL_OPTIONAL = ("idempotency_key",)

INSTRUCTIONS = """\
opsgate guards production actions with policy and human approval.
1. list_action_types: what may be proposed, with parameter schemas and the verification
   signals and stop conditions each action type runs under.
2. propose_action: policy and live preconditions decide at once. An allowed proposal waits
   for human approval (pending_approval); a blocked one carries deny codes with messages.
3. explain_decision: the deny codes and the exact policy input behind them, to correct and
   propose again. get_action / list_my_actions: follow state, approvals, execution,
   measurements and rollbacks.
You propose as an agent. Humans approve; a worker runs, verifies and rolls back by itself.
"""


def agent_identity(env: Mapping[str, str] | None = None) -> Identity:
    """The one identity every MCP call acts as: OPSGATE_AGENT_ID (default sre-agent), an agent."""
    env = os.environ if env is None else env
    agent_id = env.get(AGENT_ID_ENV, "").strip() or DEFAULT_AGENT_ID
    if not AGENT_ID_PATTERN.match(agent_id):
        raise ConfigError(
            f"{AGENT_ID_ENV}={agent_id!r}: expected 1-128 letters, digits or ._@:- (e.g. sre-agent)"
        )
    # Never the OS user and never a human: the policy and the reports tell agents apart.
    return Identity(id=agent_id, kind="agent")


# --- argument checks ---------------------------------------------------------------------


def _known_fields(arguments: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(str(key) for key in set(arguments) - set(allowed))
    if unknown:
        raise InvalidInput(unknown[0], f"unknown field (allowed: {', '.join(allowed) or 'none'})")


def _action_id(arguments: Mapping[str, Any]) -> str:
    value = arguments.get("action_id")
    if value is None:
        raise InvalidInput("action_id", "required field missing")
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput("action_id", "expected an action id (a ULID) as a string")
    if len(value) > 64 or not value.isprintable():
        raise InvalidInput("action_id", "not an action id (a ULID)")
    return value.strip()


def _bounded_int(arguments: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = arguments.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(name, "expected an integer")
    if not low <= value <= high:
        raise InvalidInput(name, f"expected {low} to {high}, got {value}")
    return value


def _states(arguments: Mapping[str, Any]) -> list[ActionState] | None:
    value = arguments.get("states")
    if value is None:
        return None
    known = [s.value for s in ActionState if s is not ActionState.PROPOSED]
    if not isinstance(value, list):
        raise InvalidInput("states", "expected a list of states")
    states: list[ActionState] = []
    for index, item in enumerate(value):
        if item not in known:
            raise InvalidInput(f"states.{index}", f"expected one of {', '.join(known)}")
        states.append(ActionState(item))
    return states


# --- the tools, transport-free -----------------------------------------------------------


class AgentTools:
    """What each tool does, synchronous and transport-free: arguments in, JSON out."""

    def __init__(self, app: App, identity: Identity) -> None:
        if identity.kind != "agent":
            raise ValueError("the MCP server acts as an agent, never as a human")
        self.app = app
        self.identity = identity
        self._handlers: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
            "list_action_types": self.list_action_types,
            "propose_action": self.propose_action,
            "get_action": self.get_action,
            "explain_decision": self.explain_decision,
            "list_my_actions": self.list_my_actions,
        }

    def open(self) -> None:
        """Open store, catalog and engine up front: they are lazy and not thread-safe."""
        self.app.gate  # noqa: B018 - loads the catalog, builds store, engine and preconditions
        self.app.store.list_actions(limit=1)  # a store that is not there fails now

    def call(self, name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Run one tool; OpsgateError (bad input, not found) and StoreError propagate."""
        return self._handlers[name](arguments)

    # --- shared pieces ---------------------------------------------------------------

    def _catalog_or_none(self) -> Catalog | None:
        try:
            return self.catalog()
        except InvalidInput:  # a broken catalog file must not hide an action's history
            return None

    def catalog(self) -> Catalog:
        """Today's catalog (the app's reload rule), so proposals hash what humans see."""
        return self.app.catalog()

    def gate(self) -> Gate:
        return self.app.gate

    def catalog_document(self) -> dict[str, Any]:
        return catalog_json(self.catalog())

    def policy_document(self) -> dict[str, Any]:
        return {
            "bundle_revision": bundle_revision(self.app.settings.policies),
            "engine": self.app.engine.name,
        }

    # --- what differs through `opsgate server` (RemoteAgentTools overrides these) ------

    def _propose(self, document: dict[str, Any]) -> ProposeOutcome:
        return self.gate().propose(document, self.identity)

    def _render_catalog(self) -> Catalog | None:
        return self._catalog_or_none()

    def _mine(self, states: list[ActionState] | None) -> list[Action]:
        """This agent's actions, oldest first, at most LIST_SCAN."""
        self.gate().expire_due()
        return self.app.store.list_actions(
            states=states, proposer_id=self.identity.id, limit=LIST_SCAN
        )

    def _details(self, action_id: str) -> ActionDetails:
        # As `opsgate show` does: an action past its TTL reads as expired, not pending;
        # and history is read from the store alone, whatever state the catalog is in.
        if self._catalog_or_none() is not None:
            with contextlib.suppress(ConfigError):
                self.gate().expire_due()
        try:
            return action_details(self.app.store, action_id)
        except NotFound:
            raise NotFound(
                f"action_id: no action {action_id}; list_my_actions lists yours"
            ) from None

    # --- tools -----------------------------------------------------------------------

    def list_action_types(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        _known_fields(arguments, ())
        return {"proposer": self.identity.model_dump(), **self.catalog_document()}

    def propose_action(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        # No `verification` override: an agent does not choose the checks that judge it.
        _known_fields(arguments, PROPOSAL_FIELDS + PROPOSAL_OPTIONAL)
        document = {k: arguments[k] for k in PROPOSAL_FIELDS + PROPOSAL_OPTIONAL if k in arguments}
        outcome = self._propose(document)
        action, decision = outcome.action, outcome.decision
        allowed = action.state is not ActionState.BLOCKED
        roles = "|".join(action.approver_roles) or "any role"
        if allowed:
            follow = (
                f"waits for {action.required_approvals} human approval(s) from {roles}; "
                "follow it with get_action"
            )
        else:
            follow = (
                "blocked by policy: correct what the deny messages say and propose again; "
                "explain_decision shows the policy input"
            )
        return {
            "id": action.id,
            "state": action.state.value,
            "allowed": allowed,
            "existing": outcome.existing,
            "deny": [d.model_dump() for d in decision.deny],
            "required_approvals": action.required_approvals,
            "approver_roles": list(action.approver_roles),
            "expires_at": ts(action.expires_at),
            "action": action.action_type,
            "target": action.target,
            "environment": action.environment,
            "params": action_json(action, self._render_catalog())["params"],
            "proposer": action.proposer.model_dump(),
            "spec_hash": action.spec_hash,
            "bundle_revision": decision.bundle_revision,
            "next": follow,
        }

    def get_action(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        _known_fields(arguments, ("action_id", "measurements"))
        action_id = _action_id(arguments)
        limit = _bounded_int(arguments, "measurements", DEFAULT_MEASUREMENTS, 0, MAX_MEASUREMENTS)
        details = self._details(action_id)
        action = details.action
        valid = {a.approver.id for a in details.approvals if a.spec_hash == action.spec_hash}
        shown = details.measurements[-limit:] if limit else []
        return {
            # Masked by the proposal-time snapshot in its events, not today's catalog.
            "action": action_json(action, self._render_catalog(), details.events),
            "state": action.state.value,
            "terminal": action.state.terminal,
            "state_reason": _state_reason(details.events),
            "approvals": {
                "count": len(valid),
                "required": action.required_approvals,
                "roles": list(action.approver_roles),
                "by": [approval_json(a) for a in details.approvals],
            },
            "plan": plan_of(details, self._catalog_or_none()),
            "execution": _execution_summary(details),
            "rollback": _rollback_summary(details),
            "measurements": {
                "total": len(details.measurements),
                "shown": [measurement_json(m) for m in shown],
            },
            "events": [_event_line(e) for e in details.events],
            "trust": trust_view(details.decisions),
        }

    def explain_decision(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        _known_fields(arguments, ("action_id",))
        details = self._details(_action_id(arguments))
        action = details.action
        current = self.policy_document()["bundle_revision"]
        decisions = [decision_json(d) for d in details.decisions]
        latest = details.decisions[-1] if details.decisions else None
        if latest is None:
            advice = "no decision recorded"
        elif latest.allow:
            advice = "the policy allowed it; humans decide the rest (see get_action)"
        else:
            advice = (
                "each deny says what to change; `input` is exactly what the policy saw. "
                "Propose again with the correction: a blocked action is never retried."
            )
            if TRUST_REVOKED in latest.deny_codes:
                advice = (
                    "your last run of this action type was rolled back, so the policy "
                    "blocks the type for you until a human with the right role runs "
                    "`opsgate trust reset`; ask one, citing that run"
                )
        return {
            "action_id": action.id,
            "action": action.action_type,
            "target": action.target,
            "environment": action.environment,
            "state": action.state.value,
            "decisions": decisions,
            "current_bundle_revision": current,
            "bundle_changed_since": latest is not None and latest.bundle_revision != current,
            "advice": advice,
            "trust": trust_view(details.decisions),
        }

    def list_my_actions(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        _known_fields(arguments, ("limit", "states"))
        limit = _bounded_int(arguments, "limit", DEFAULT_LIST_LIMIT, 1, MAX_LIST_LIMIT)
        states = _states(arguments)
        found = self._mine(states)
        catalog = self._render_catalog()
        newest = list(reversed(found))[:limit]
        return {
            "proposer": self.identity.model_dump(),
            "actions": [_action_line(a, catalog) for a in newest],
            "count": len(newest),
            # Only the oldest LIST_SCAN were read: the newest may be missing.
            "incomplete": len(found) >= LIST_SCAN,
        }


class RemoteAgentTools(AgentTools):
    """The same tools through `opsgate server` with an agent token (OPSGATE_URL and
    OPSGATE_TOKEN): this process holds no database credentials and names no identity;
    the server knows the agent from its token, and decides and records as for the CLI."""

    def __init__(self, app: App, remote: Any) -> None:
        answer = remote.whoami()
        if answer.get("kind") != "agent":
            raise ConfigError(
                f"opsgate mcp needs an agent token; OPSGATE_TOKEN is {answer.get('id')}'s "
                f"({answer.get('kind')})"
            )
        super().__init__(app, Identity(id=answer["id"], kind="agent"))
        self.remote = remote

    def open(self) -> None:
        self.remote.policy_document()  # a server that is not there fails now

    def catalog_document(self) -> dict[str, Any]:
        return dict(self.remote.catalog_document())

    def policy_document(self) -> dict[str, Any]:
        return dict(self.remote.policy_document())

    def _propose(self, document: dict[str, Any]) -> ProposeOutcome:
        return self.remote.propose(document, self.identity)

    def _render_catalog(self) -> Catalog | None:
        return None  # the server masked secret parameters already

    def _mine(self, states: list[ActionState] | None) -> list[Action]:
        return self.remote.my_actions(states, LIST_SCAN)

    def _details(self, action_id: str) -> ActionDetails:
        try:
            return self.remote.details(action_id)
        except NotFound:
            raise NotFound(
                f"action_id: no action {action_id}; list_my_actions lists yours"
            ) from None


def _action_line(action: Action, catalog: Catalog | None) -> dict[str, Any]:
    document = action_json(action, catalog)
    keep = (
        "id", "action", "target", "environment", "params", "state", "required_approvals",
        "approver_roles", "reason", "created_at", "updated_at", "expires_at",
    )  # fmt: skip
    return {k: document[k] for k in keep}


def _event_line(event: AuditEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "at": ts(event.at),
        "kind": event.kind,
        "actor": event.actor,
        "from_state": event.from_state,
        "to_state": event.to_state,
    }


def trust_view(decisions: Sequence[Decision]) -> dict[str, Any] | None:
    """The proposer's own track record and trust-ladder rung, as the newest propose or
    execute decision saw them: why it needs the approvals it needs, in the policy's words,
    so an agent can explain itself to the human it asks."""
    for decision in reversed(decisions):
        if decision.phase not in ("propose", "execute"):
            continue
        proposer = decision.input.get("proposer")
        record = proposer.get("track_record") if isinstance(proposer, Mapping) else None
        result: Mapping[str, Any] = decision.result if isinstance(decision.result, Mapping) else {}
        found = result.get("ladder")
        ladder: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
        return {
            "as_of": ts(decision.decided_at),
            "phase": decision.phase,
            "rung": ladder.get("rung"),
            "required_approvals": decision.required_approvals,
            "human_would_need": ladder.get("human_approvals"),
            "why": ladder.get("reason"),
            "revoked": TRUST_REVOKED in decision.deny_codes,
            "track_record": record,
        }
    return None


def _state_reason(events: list[AuditEvent]) -> str | None:
    """Why the action is in its state: the reason or message of its latest transition."""
    for event in reversed(events):
        if event.to_state is None:
            continue
        data = event.data or {}
        reason = data.get("message") or data.get("reason")
        if reason:
            return str(reason)
        if data.get("deny"):
            return "denied: " + ", ".join(str(c) for c in data["deny"])
        return None
    return None


def _execution_summary(details: ActionDetails) -> dict[str, Any] | None:
    if details.execution is None:
        return None
    document = execution_json(details.execution)
    # Internal evaluator state: large, and the measurements already carry the evidence.
    document.pop("verify_state", None)
    document.pop("rollback_verify_state", None)
    for key in ("run_output", "undo_output", "capture_output"):
        text = document.get(key) or ""
        document[key] = text[-OUTPUT_TAIL:]
    return document


def _rollback_summary(details: ActionDetails) -> dict[str, Any] | None:
    """Why and when it was rolled back, and how long verifying the rollback took."""
    execution = details.execution
    decided = [e for e in details.events if e.to_state == ActionState.ROLLING_BACK.value]
    if execution is None or (execution.rollback_decided_at is None and not decided):
        return None
    reason = (decided[-1].data or {}).get("reason") if decided else None
    return {
        "reason": reason or execution.reason or None,
        "requested_by": execution.rollback_requested_by,
        "trigger": {
            "name": execution.trigger_name,
            "kind": execution.trigger_kind,
            "value": execution.trigger_value,
        }
        if execution.trigger_name
        else None,
        "decided_at": ts(execution.rollback_decided_at),
        "verified_at": ts(execution.rollback_verified_at),
        "rollback_time_seconds": execution.rollback_time,
    }


# --- MCP surface -------------------------------------------------------------------------

_ACTION_ID = {"type": "string", "description": "An action id (ULID) from propose_action."}
_READ_ONLY = types.ToolAnnotations(read_only_hint=True, open_world_hint=False)

TOOLS: tuple[types.Tool, ...] = (
    types.Tool(
        name="list_action_types",
        title="List action types",
        description=(
            "The action types that may be proposed: name, description, risk, whether it "
            "can be rolled back, its parameters as JSON schema, and the default "
            "verification (signals and stop conditions) it runs under."
        ),
        input_schema={"type": "object", "properties": {}, "additionalProperties": False},
        annotations=_READ_ONLY,
    ),
    types.Tool(
        name="propose_action",
        title="Propose an action",
        description=(
            "Propose a mitigation. It is validated against the catalog and checked by "
            "policy and live preconditions at once: the result is pending_approval "
            "(humans approve it; it never runs without them) or blocked, with deny codes "
            "and messages. A blocked action is final; correct it and propose again."
        ),
        input_schema={
            "type": "object",
            "properties": {
                "action": {
                    "type": "string",
                    "pattern": NAME_PATTERN,
                    "description": "Action type name, from list_action_types.",
                },
                "target": {
                    "type": "string",
                    "pattern": TARGET_PATTERN,
                    "description": "The service or resource acted on, e.g. checkout.",
                },
                "environment": {
                    "type": "string",
                    "pattern": r"^[a-z][a-z0-9-]{0,31}$",
                    "description": "e.g. prod, staging.",
                },
                "params": {
                    "type": "object",
                    "additionalProperties": {"type": ["string", "integer", "number", "boolean"]},
                    "description": "The action type's parameters (schema in list_action_types).",
                },
                "reason": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_REASON_LENGTH,
                    "description": "Why, with the evidence; approvers and auditors read it.",
                },
                "incident": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "maxLength": 128},
                        "severity": {"enum": ["sev1", "sev2", "sev3", "sev4"]},
                        "class": {
                            "type": "string",
                            "maxLength": 64,
                            "description": "e.g. deploy-related, capacity-saturation.",
                        },
                        "tier": {"enum": ["critical", "standard", "internal"]},
                    },
                    "additionalProperties": False,
                },
                "idempotency_key": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 128,
                    "description": "A retry with the same key returns the same action.",
                },
            },
            "required": ["action", "target", "environment", "reason"],
            "additionalProperties": False,
        },
        annotations=types.ToolAnnotations(
            read_only_hint=False,
            destructive_hint=False,  # it only queues a proposal for humans
            idempotent_hint=False,
            open_world_hint=False,
        ),
    ),
    types.Tool(
        name="get_action",
        title="Get an action",
        description=(
            "One action: state and why, approvals so far, the execution (outcome, reason, "
            "what fired), rollback (reason, rollback time) and the latest measurements."
        ),
        input_schema={
            "type": "object",
            "properties": {
                "action_id": _ACTION_ID,
                "measurements": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": MAX_MEASUREMENTS,
                    "default": DEFAULT_MEASUREMENTS,
                    "description": "How many of the latest measurements to include.",
                },
            },
            "required": ["action_id"],
            "additionalProperties": False,
        },
        annotations=_READ_ONLY,
    ),
    types.Tool(
        name="explain_decision",
        title="Explain a policy decision",
        description=(
            "Every policy decision on an action (at proposal, at execution, on approval): "
            "allow, deny codes with messages, and the exact policy input that produced "
            "them, so a refused proposal can be corrected and proposed again."
        ),
        input_schema={
            "type": "object",
            "properties": {"action_id": _ACTION_ID},
            "required": ["action_id"],
            "additionalProperties": False,
        },
        annotations=_READ_ONLY,
    ),
    types.Tool(
        name="list_my_actions",
        title="List my actions",
        description="Actions proposed by this agent, newest first, with their states.",
        input_schema={
            "type": "object",
            "properties": {
                "limit": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_LIST_LIMIT,
                    "default": DEFAULT_LIST_LIMIT,
                },
                "states": {
                    "type": "array",
                    "items": {
                        "enum": [s.value for s in ActionState if s is not ActionState.PROPOSED]
                    },
                    "description": "Only actions in these states.",
                },
            },
            "additionalProperties": False,
        },
        annotations=_READ_ONLY,
    ),
)
_TOOLS_BY_NAME = {tool.name: tool for tool in TOOLS}

RESOURCES: tuple[types.Resource, ...] = (
    types.Resource(
        uri=CATALOG_URI,
        name="catalog",
        title="Action catalog",
        description="Every action type with parameter schemas, risk and default verification.",
        mime_type="application/json",
    ),
    types.Resource(
        uri=POLICY_REVISION_URI,
        name="policy-revision",
        title="Policy bundle revision",
        description="The hash of the policy bundle every decision is made (and stored) with.",
        mime_type="application/json",
    ),
)


def _dump(document: Mapping[str, Any]) -> str:
    return json.dumps(document, default=str, ensure_ascii=False)


def _tool_error(message: str, field: str | None = None) -> types.CallToolResult:
    error: dict[str, Any] = {"message": message}
    if field is not None:
        error["field"] = field
    return types.CallToolResult(
        content=[types.TextContent(text=message)],
        structured_content={"error": error},
        is_error=True,
    )


def build_server(tools: AgentTools) -> Server[Any]:
    """A low-level SDK server: opsgate's own validation checks every argument."""

    async def list_tools(
        ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=list(TOOLS))

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        if params.name not in _TOOLS_BY_NAME:
            raise MCPError(
                types.INVALID_PARAMS,
                f"unknown tool {params.name!r} (tools: {', '.join(_TOOLS_BY_NAME)})",
            )
        arguments = dict(params.arguments or {})
        try:
            # The gate is synchronous (SQL, Rego): keep the event loop free for other calls.
            document = await anyio.to_thread.run_sync(tools.call, params.name, arguments)
        except InvalidInput as exc:
            return _tool_error(str(exc), exc.field)
        except OpsgateError as exc:
            return _tool_error(str(exc))
        except StoreError as exc:
            return _tool_error(f"store: {exc}; try again later")
        except Exception as exc:
            log.exception("tool %s failed", params.name)
            return _tool_error(f"unexpected {type(exc).__name__}; the server log has the details")
        # Round-trip so the structured content is plain JSON, exactly what the text says.
        text = _dump(document)
        return types.CallToolResult(
            content=[types.TextContent(text=text)], structured_content=json.loads(text)
        )

    async def list_resources(
        ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=list(RESOURCES))

    async def read_resource(
        ctx: Any, params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        readers = {CATALOG_URI: tools.catalog_document, POLICY_REVISION_URI: tools.policy_document}
        reader = readers.get(str(params.uri))
        if reader is None:
            raise MCPError(types.INVALID_PARAMS, f"unknown resource {params.uri}")
        try:
            document = await anyio.to_thread.run_sync(reader)
        except (OpsgateError, OSError) as exc:
            raise MCPError(types.INTERNAL_ERROR, f"{params.uri}: {exc}") from None
        return types.ReadResourceResult(
            contents=[
                types.TextResourceContents(
                    uri=params.uri, mime_type="application/json", text=_dump(document)
                )
            ]
        )

    def input_schema(name: str) -> Mapping[str, Any] | None:
        tool = _TOOLS_BY_NAME.get(name)
        return None if tool is None else tool.input_schema

    return Server(
        "opsgate",
        version=__version__,
        title="opsgate",
        description="Policy-guarded production actions: agents propose, humans approve.",
        instructions=INSTRUCTIONS,
        get_tool_input_schema=input_schema,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_read_resource=read_resource,
    )


async def serve_stdio(server: Server[Any]) -> None:
    """Serve one client over stdin/stdout until it closes stdin."""
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


def listen(host: str, port: int) -> socket.socket:
    """Bind before serving, so the port is known (even `0`) and connections queue."""
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        return socket.create_server(address, family=family)
    except OSError as exc:
        raise ConfigError(f"--http {port} --host {host}: {exc.strerror or exc}") from None


def http_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/mcp"


async def serve_http(server: Server[Any], sock: socket.socket, host: str) -> None:
    """Serve streamable HTTP at /mcp on an already bound socket until SIGINT/SIGTERM."""
    import uvicorn  # only the HTTP transport needs it

    # `host` turns on the SDK's DNS-rebinding protection for loopback addresses.
    app = server.streamable_http_app(host=host)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    await uvicorn.Server(config).serve(sockets=[sock])


def announce(message: str) -> None:
    """One line on stderr: stdout belongs to the protocol on stdio."""
    print(f"opsgate mcp: {message}", file=sys.stderr, flush=True)
