"""The MCP tools in process: an SDK client against `build_server`, a real SQLite store,
the default Rego bundle. What an agent may do, what it may not, and what it is told."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult

from opsgate import app as app_module
from opsgate.app import App
from opsgate.config import Settings
from opsgate.errors import ConfigError, InvalidInput
from opsgate.executor.executor import Executor
from opsgate.executor.runners import RunnerRegistry, StepResult
from opsgate.mcp_server import (
    CATALOG_URI,
    POLICY_REVISION_URI,
    AgentTools,
    agent_identity,
    build_server,
)
from opsgate.models import ActionState, Identity, Step
from opsgate.policies.engine import bundle_revision
from opsgate.testing_signals import StaticSignalProvider

ROOT = Path(__file__).resolve().parents[2]
AGENT = Identity(id="sre-agent", kind="agent")
ALICE = Identity(id="alice", kind="human")
BOB = Identity(id="bob", kind="human")
CAROL = Identity(id="carol", kind="human")
TOOLS = {"list_action_types", "propose_action", "get_action", "explain_decision", "list_my_actions"}
FORBIDDEN = ("approve", "reject", "run", "rollback", "roll_back", "cancel", "execute")


def scale(replicas: int = 6, **overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "action": "scale_deployment",
        "target": "checkout",
        "environment": "prod",
        "params": {"deployment": "checkout", "replicas": replicas},
        "reason": "p99 latency over SLO since 14:02",
        "incident": {"id": "INC-42", "severity": "sev2", "class": "capacity-saturation"},
    }
    document.update(overrides)
    return document


class Harness:
    """AgentTools over a migrated SQLite file; `session` runs a scenario with a client."""

    def __init__(self, sqlite_url: str, catalog: Path, identity: Identity = AGENT) -> None:
        self.app = App(Settings(db=sqlite_url, catalog=catalog, policies=ROOT / "policies"))
        self.tools = AgentTools(self.app, identity)
        self.tools.open()
        self.server = build_server(self.tools)

    def session(self, scenario: Callable[[Client], Awaitable[None]]) -> None:
        async def main() -> None:
            async with Client(self.server) as client:
                await scenario(client)

        anyio.run(main)

    def rows(self) -> dict[str, int]:
        return self.app.store.row_counts()


@pytest.fixture
def harness(sqlite_url: str) -> Iterator[Harness]:
    h = Harness(sqlite_url, ROOT / "catalog")
    yield h
    h.app.close()


async def call(client: Client, name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """A tool call that must succeed; its structured content, checked against its text."""
    result = await client.call_tool(name, dict(arguments))
    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    assert json.loads(text_of(result)) == result.structured_content
    return result.structured_content


def text_of(result: CallToolResult) -> str:
    block = result.content[0]
    assert block.type == "text"
    return block.text


# --- identity ------------------------------------------------------------------------------


def test_the_identity_is_always_an_agent() -> None:
    assert agent_identity({}) == AGENT
    assert agent_identity({"OPSGATE_AGENT_ID": "  "}) == AGENT
    assert agent_identity({"OPSGATE_AGENT_ID": "demo-agent"}) == Identity(
        id="demo-agent", kind="agent"
    )
    # The CLI's identity settings do not reach the MCP server.
    env = {"OPSGATE_IDENTITY": "env", "OPSGATE_USER": "alice", "OPSGATE_USER_KIND": "human"}
    assert agent_identity(env) == AGENT
    for bad in ("two words", "nul\x00", "-x" * 100, "ünïcode"):
        with pytest.raises(ConfigError, match="OPSGATE_AGENT_ID"):
            agent_identity({"OPSGATE_AGENT_ID": bad})


def test_the_tools_refuse_a_human_identity(sqlite_url: str) -> None:
    with pytest.raises(ValueError, match="agent"):
        Harness(sqlite_url, ROOT / "catalog", identity=ALICE)


# --- what is offered -----------------------------------------------------------------------


def test_tools_and_resources_offered(harness: Harness) -> None:
    async def scenario(client: Client) -> None:
        tools = (await client.list_tools()).tools
        names = {t.name for t in tools}
        assert names == TOOLS
        assert not [n for n in names if any(verb in n for verb in FORBIDDEN)]
        for tool in tools:
            assert tool.input_schema["type"] == "object"
            assert tool.input_schema["additionalProperties"] is False
            assert tool.description
        by_name = {t.name: t for t in tools}
        assert set(by_name["propose_action"].input_schema["required"]) == {
            "action", "target", "environment", "reason",
        }  # fmt: skip
        assert "verification" not in by_name["propose_action"].input_schema["properties"]
        reads = {n for n, t in by_name.items() if t.annotations and t.annotations.read_only_hint}
        assert reads == TOOLS - {"propose_action"}

        listed = await call(client, "list_action_types", {})
        assert listed["proposer"] == {"id": "sre-agent", "kind": "agent"}
        types = {t["name"]: t for t in listed["action_types"]}
        assert set(types) == {p.stem for p in (ROOT / "catalog").glob("*.yaml")}
        scale_type = types["scale_deployment"]
        assert scale_type["risk"] == "medium" and scale_type["reversible"] is True
        assert types["drain_node"]["reversible"] is False
        params = scale_type["params"]
        assert params["properties"]["replicas"] == {
            "type": "integer", "minimum": 0, "maximum": 1000,
            "description": "Desired replica count",
        }  # fmt: skip
        assert params["required"] == ["deployment", "replicas"]  # namespace has a default
        verification = scale_type["verification"]
        assert [s["name"] for s in verification["signals"]] == ["error_rate", "latency_p99"]
        assert verification["stop_conditions"][0]["halt"] == {"baseline_plus": 0.05}

        resources = {str(r.uri) for r in (await client.list_resources()).resources}
        assert resources == {CATALOG_URI, POLICY_REVISION_URI}
        catalog = json.loads((await client.read_resource(CATALOG_URI)).contents[0].text)  # type: ignore[union-attr]
        assert catalog["catalog_revision"] == listed["catalog_revision"]
        assert catalog["action_types"] == listed["action_types"]
        policy = json.loads((await client.read_resource(POLICY_REVISION_URI)).contents[0].text)  # type: ignore[union-attr]
        assert policy == {
            "bundle_revision": bundle_revision(ROOT / "policies"),
            "engine": "embedded",
        }
        with pytest.raises(MCPError, match="unknown resource"):
            await client.read_resource("opsgate://secrets")
        with pytest.raises(MCPError, match="unknown tool 'approve_action'"):
            await client.call_tool("approve_action", {"action_id": "x"})

    harness.session(scenario)


# --- proposing -----------------------------------------------------------------------------


def test_propose_allowed_and_blocked_then_explain(harness: Harness) -> None:
    async def scenario(client: Client) -> None:
        allowed = await call(client, "propose_action", scale(6))
        assert allowed["state"] == "pending_approval" and allowed["allowed"] is True
        assert allowed["deny"] == [] and allowed["existing"] is False
        assert allowed["proposer"] == {"id": "sre-agent", "kind": "agent"}
        assert allowed["required_approvals"] >= 1 and allowed["approver_roles"]
        assert allowed["params"] == {
            "deployment": "checkout",
            "namespace": "default",
            "replicas": 6,
        }
        assert "human approval" in allowed["next"]

        # Within the catalog's bounds (1000), beyond the policy's prod bound (50).
        blocked = await call(client, "propose_action", scale(60))
        assert blocked["state"] == "blocked" and blocked["allowed"] is False
        assert [d["code"] for d in blocked["deny"]] == ["param_out_of_bounds"]
        assert "50" in blocked["deny"][0]["message"]

        drain = await call(
            client,
            "propose_action",
            {
                "action": "drain_node",
                "target": "node-7",
                "environment": "prod",
                "params": {"node": "node-7"},
                "reason": "kernel soft lockups",
            },
        )
        assert "not_allowlisted" in [d["code"] for d in drain["deny"]]

        explained = await call(client, "explain_decision", {"action_id": blocked["id"]})
        assert explained["state"] == "blocked"
        (decision,) = explained["decisions"]
        assert decision["phase"] == "propose" and decision["allow"] is False
        assert [d["code"] for d in decision["deny"]] == ["param_out_of_bounds"]
        policy_input = decision["input"]
        assert {k: policy_input["proposer"][k] for k in ("id", "kind")} == {
            "id": "sre-agent",
            "kind": "agent",
        }
        # The agent's own record as the decision saw it: one earlier proposal, allowed.
        record = policy_input["proposer"]["track_record"]
        assert record["overall"]["proposals"] == 1 and record["overall"]["blocked"] == 0
        assert explained["trust"]["track_record"] == record
        assert explained["trust"]["rung"] == "probation"
        assert "fewer than 5" in explained["trust"]["why"]
        assert policy_input["action"]["params"]["replicas"] == 60
        assert policy_input["context"]["phase"] == "propose"
        assert explained["current_bundle_revision"] == decision["bundle_revision"]
        assert explained["bundle_changed_since"] is False

        # Corrected and proposed again: a new action, allowed.
        again = await call(client, "propose_action", scale(40))
        assert again["allowed"] is True and again["id"] != blocked["id"]

    harness.session(scenario)
    stored = harness.app.store.list_actions(limit=10)
    assert len(stored) == 4
    assert {(a.proposer.id, a.proposer.kind) for a in stored} == {("sre-agent", "agent")}


def test_idempotency_key(harness: Harness) -> None:
    async def scenario(client: Client) -> None:
        first = await call(client, "propose_action", scale(6, idempotency_key="inc-42-scale"))
        retry = await call(client, "propose_action", scale(6, idempotency_key="inc-42-scale"))
        assert retry["id"] == first["id"] and retry["existing"] is True
        clash = await client.call_tool("propose_action", scale(7, idempotency_key="inc-42-scale"))
        assert clash.is_error and "inc-42-scale" in text_of(clash)

    harness.session(scenario)
    assert harness.rows()["actions"] == 1


def with_params(**params: Any) -> dict[str, Any]:
    return scale(params=params)


BAD_ARGUMENTS: list[tuple[str, dict[str, Any], str]] = [
    ("propose_action", {}, "action"),
    ("propose_action", {k: v for k, v in scale().items() if k != "target"}, "target"),
    ("propose_action", {k: v for k, v in scale().items() if k != "reason"}, "reason"),
    ("propose_action", scale(action="reboot_the_world"), "action"),
    ("propose_action", scale(action="Bad Name"), "action"),
    ("propose_action", scale(target="Not A Target"), "target"),
    ("propose_action", scale(environment=7), "environment"),
    ("propose_action", with_params(deployment="checkout", replicas="six"), "params.replicas"),
    ("propose_action", with_params(deployment="checkout", replicas=5000), "params.replicas"),
    ("propose_action", with_params(deployment="checkout", replicas=True), "params.replicas"),
    ("propose_action", with_params(replicas=6), "params.deployment"),
    ("propose_action", with_params(deployment="Checkout!", replicas=6), "params.deployment"),
    ("propose_action", with_params(deployment="checkout", replicas=6, x=1), "params.x"),
    ("propose_action", scale(params="replicas=6"), "params"),
    ("propose_action", scale(reason=""), "reason"),
    ("propose_action", scale(reason="bad\x07bell"), "reason"),
    ("propose_action", scale(incident={"severity": "sev9"}), "incident.severity"),
    ("propose_action", scale(incident={"tier": "critical", "owner": "x"}), "incident.owner"),
    ("propose_action", scale(verification={"hold": "0s"}), "verification"),
    ("propose_action", scale(proposer={"id": "alice", "kind": "human"}), "proposer"),
    ("get_action", {}, "action_id"),
    ("get_action", {"action_id": 42}, "action_id"),
    ("get_action", {"action_id": "01JXNOSUCHACTION000000000"}, "action_id"),
    ("get_action", {"action_id": "x", "measurements": -1}, "measurements"),
    ("get_action", {"action_id": "x", "measurements": True}, "measurements"),
    ("explain_decision", {"action_id": ""}, "action_id"),
    ("explain_decision", {"action_id": "x", "verbose": True}, "verbose"),
    ("list_my_actions", {"limit": 0}, "limit"),
    ("list_my_actions", {"limit": "10"}, "limit"),
    ("list_my_actions", {"states": ["nope"]}, "states.0"),
    ("list_my_actions", {"states": "blocked"}, "states"),
    ("list_action_types", {"name": "x"}, "name"),
]


def test_bad_arguments_are_tool_errors_naming_the_field_and_store_nothing(
    harness: Harness,
) -> None:
    before = harness.rows()
    seen: list[str] = []

    async def scenario(client: Client) -> None:
        for tool, arguments, field in BAD_ARGUMENTS:
            result = await client.call_tool(tool, arguments)
            text = text_of(result)
            assert result.is_error, (tool, arguments, text)
            assert text.startswith(f"{field}:"), (tool, arguments, text)
            assert "\n" not in text
            assert isinstance(result.structured_content, dict)
            assert result.structured_content["error"]["message"] == text
            seen.append(text)

    harness.session(scenario)
    assert harness.rows() == before
    assert len(seen) == len(BAD_ARGUMENTS)
    assert "5000 is above the maximum 1000" in seen[8]


# --- following -----------------------------------------------------------------------------


def test_list_my_actions_is_newest_first_and_only_mine(harness: Harness) -> None:
    # A human's proposal on the same store is not the agent's.
    harness.app.gate.propose(scale(8, target="cart"), ALICE)

    async def scenario(client: Client) -> None:
        ids = [(await call(client, "propose_action", scale(n)))["id"] for n in (6, 60, 7)]
        mine = await call(client, "list_my_actions", {})
        assert mine["proposer"] == {"id": "sre-agent", "kind": "agent"}
        assert [a["id"] for a in mine["actions"]] == ids[::-1]
        assert [a["state"] for a in mine["actions"]] == [
            "pending_approval", "blocked", "pending_approval",
        ]  # fmt: skip
        assert mine["incomplete"] is False
        newest = await call(client, "list_my_actions", {"limit": 2})
        assert [a["id"] for a in newest["actions"]] == ids[:0:-1]
        blocked = await call(client, "list_my_actions", {"states": ["blocked"]})
        assert [a["id"] for a in blocked["actions"]] == [ids[1]]

    harness.session(scenario)


class StepRunner:
    """A fake runner: `get` captures 3 replicas, `scale` makes the error rate spike once."""

    name = "fake"

    def __init__(self, provider: StaticSignalProvider) -> None:
        self.provider = provider
        self.calls: list[list[str]] = []

    def run(
        self,
        step: Step,
        values: Mapping[str, Any],
        *,
        secrets: Collection[str] = (),
        cancel: threading.Event | None = None,
    ) -> StepResult:
        assert step.argv is not None
        self.calls.append([part.format(**values) for part in step.argv])
        if self.calls[-1][0] == "scale":
            # The first scale (run) breaks things; the second (undo) mends them.
            self.provider.set(ERR, 0.5 if len(self.calls) == 2 else 0.001)
        return StepResult(True, 0, "ok", value="3")


ERR = 'err{service="checkout"}'
FAKE_SCALE = """
name: scale_deployment
risk: medium
params:
  deployment: {type: string, pattern: "^[a-z0-9-]{1,63}$"}
  replicas: {type: integer, minimum: 0, maximum: 1000}
capture: {runner: fake, argv: [get, "{deployment}"], as: previous_replicas}
run: {runner: fake, argv: [scale, "{deployment}", "{replicas}"], timeout: 5s}
undo: {runner: fake, argv: [scale, "{deployment}", "{previous_replicas}"], timeout: 5s}
verification:
  interval: 0.05s
  hold: 0.15s
  timeout: 2s
  signals:
    - {name: error_rate, query: 'err{service="{target}"}', pass: {max: 0.01}}
  stop_conditions:
    - {name: error_spike, query: 'err{service="{target}"}', halt: {min: 0.2}}
  failure_limit: 1
  error_limit: 2
"""


def test_get_action_follows_approvals_execution_and_rollback(
    sqlite_url: str, tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "scale_deployment.yaml").write_text(FAKE_SCALE)
    harness = Harness(sqlite_url, catalog)
    provider = StaticSignalProvider({ERR: 0.001})
    runner = StepRunner(provider)
    store = harness.app.store
    executor = Executor(
        store,
        harness.app.gate,
        provider,
        RunnerRegistry({"fake": runner}),
        worker_id="test-worker",
        lease=30,
    )
    action_id = ""

    async def propose(client: Client) -> None:
        nonlocal action_id
        proposed = await call(client, "propose_action", scale(6, incident={"tier": "critical"}))
        action_id = proposed["id"]
        # Two for a critical-tier incident in prod, one more: the agent has no verified
        # passes of this type yet (the trust ladder's probation).
        assert proposed["required_approvals"] == 3
        waiting = await call(client, "get_action", {"action_id": action_id})
        assert waiting["state"] == "pending_approval" and waiting["terminal"] is False
        assert waiting["approvals"]["count"] == 0 and waiting["approvals"]["required"] == 3
        trust = waiting["trust"]
        assert trust["rung"] == "probation" and trust["human_would_need"] == 2
        assert trust["required_approvals"] == 3 and trust["revoked"] is False
        assert trust["track_record"]["action_type"]["verified_passes"] == 0
        assert waiting["execution"] is None and waiting["rollback"] is None

    async def follow(client: Client) -> None:
        got = await call(client, "get_action", {"action_id": action_id, "measurements": 3})
        assert got["state"] == "rolled_back" and got["terminal"] is True
        assert got["approvals"]["count"] == 3
        assert {a["approver"]["id"] for a in got["approvals"]["by"]} == {"alice", "bob", "carol"}
        execution = got["execution"]
        assert execution["outcome"] == "stopped"
        assert "verify_state" not in execution and "rollback_verify_state" not in execution
        rollback = got["rollback"]
        assert rollback["trigger"]["name"] == "error_spike"
        assert rollback["trigger"]["kind"] == "stop_condition"
        assert rollback["trigger"]["value"] == pytest.approx(0.5)
        assert rollback["reason"] and rollback["requested_by"] is None
        assert rollback["rollback_time_seconds"] > 0 and rollback["verified_at"]
        measurements = got["measurements"]
        assert measurements["total"] > 3 and len(measurements["shown"]) == 3
        assert measurements["shown"][-1]["phase"] == "rollback"
        assert got["events"][-1]["to_state"] == "rolled_back"
        explained = await call(client, "explain_decision", {"action_id": action_id})
        phases = [d["phase"] for d in explained["decisions"]]
        assert "propose" in phases and "execute" in phases
        mine = await call(client, "list_my_actions", {})
        assert mine["actions"][0]["state"] == "rolled_back"
        # Rolled back: the type is closed to this agent until a human resets its trust.
        again = await call(client, "propose_action", scale(6))
        assert [d["code"] for d in again["deny"]] == ["trust_revoked"]
        why = await call(client, "explain_decision", {"action_id": again["id"]})
        assert why["trust"]["revoked"] is True and why["trust"]["rung"] == "revoked"
        assert "opsgate trust reset" in why["advice"]
        record = why["trust"]["track_record"]["action_type_in_environment"]
        assert record["automatic_rollbacks"] == 1 and record["stop_conditions"] == 1
        assert record["last_run"]["rolled_back"] is True

    try:
        harness.session(propose)
        harness.app.gate.approve(action_id, BOB)
        harness.app.gate.approve(action_id, CAROL)
        harness.app.gate.approve(action_id, ALICE)
        claimed = executor.claim(action_id)
        assert claimed is not None and claimed.state is ActionState.EXECUTING
        executor.launch(action_id)
        assert executor.wait_idle(timeout=10)
        harness.session(follow)
    finally:
        executor.close()
        harness.app.close()


def test_an_expired_action_reads_as_expired(harness: Harness) -> None:
    proposal = harness.app.gate.propose(scale(6), AGENT)
    with harness.app.store.transaction() as tx:
        # Backdate the deadline instead of waiting an hour for it.
        tx.update_action(proposal.action.id, expires_at=proposal.action.created_at)

    async def scenario(client: Client) -> None:
        got = await call(client, "get_action", {"action_id": proposal.action.id})
        assert got["state"] == "expired"

    harness.session(scenario)


# --- the catalog as it is today ------------------------------------------------------------


def test_catalog_changes_are_picked_up_and_a_broken_edit_keeps_the_last_good_one(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "RELOAD_CHECK_SECONDS", 0.0)  # look at every call
    catalog = tmp_path / "catalog"
    shutil.copytree(ROOT / "catalog", catalog)
    harness = Harness(sqlite_url, catalog)
    restart = (catalog / "restart_service.yaml").read_text()

    async def scenario(client: Client) -> None:
        before = await call(client, "list_action_types", {})
        (catalog / "restart_worker.yaml").write_text(
            restart.replace("name: restart_service", "name: restart_worker")
        )
        after = await call(client, "list_action_types", {})
        assert after["catalog_revision"] != before["catalog_revision"]
        assert "restart_worker" in {t["name"] for t in after["action_types"]}

        # A broken edit: the process stays up and keeps serving (and hashing proposals
        # against) the catalog that last loaded; the edit is counted, not used.
        (catalog / "restart_worker.yaml").write_text("name: [broken\n")
        still = await call(client, "list_action_types", {})
        assert still == after
        proposed = await call(client, "propose_action", scale(6))
        assert proposed["state"] == "pending_approval"
        assert harness.app.catalogs.failures == 1
        assert "restart_worker.yaml" in (harness.app.catalogs.error or "")
        await call(client, "list_action_types", {})
        assert harness.app.catalogs.failures == 1  # the same broken edit is reported once

        (catalog / "restart_worker.yaml").unlink()
        fixed = await call(client, "list_action_types", {})
        assert fixed["catalog_revision"] == before["catalog_revision"]
        assert harness.app.catalogs.error is None

    try:
        harness.session(scenario)
    finally:
        harness.app.close()


def test_a_catalog_that_never_loaded_fails_closed(sqlite_url: str, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    shutil.copytree(ROOT / "catalog", catalog)
    (catalog / "restart_worker.yaml").write_text("name: [broken\n")
    app = App(Settings(db=sqlite_url, catalog=catalog, policies=ROOT / "policies"))
    tools = AgentTools(app, AGENT)
    try:
        with pytest.raises(InvalidInput, match=r"restart_worker\.yaml"):
            tools.open()
        rows = app.store.row_counts()
        for name, arguments in (("list_action_types", {}), ("propose_action", scale(6))):
            with pytest.raises(InvalidInput, match=r"restart_worker\.yaml"):
                tools.call(name, arguments)
        assert app.store.row_counts() == rows
    finally:
        app.close()
