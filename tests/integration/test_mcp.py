"""`opsgate mcp` as an agent meets it: a real subprocess, driven by the official SDK's
client over stdio and over streamable HTTP, then read back with the `opsgate` CLI."""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import anyio
import pytest
from mcp import Client, ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import CallToolResult

from opsgate.cli.context import CliConfig
from opsgate.config import Settings
from opsgate.models import Identity
from opsgate.store.sql import SqlStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXPECTED_TOOLS = {
    "list_action_types", "propose_action", "get_action", "explain_decision", "list_my_actions",
}  # fmt: skip
FORBIDDEN = ("approve", "reject", "run", "rollback", "roll_back", "cancel", "execute")
ALLOWED = {
    "action": "scale_deployment",
    "target": "checkout",
    "environment": "prod",
    "params": {"deployment": "checkout", "replicas": 6},
    "reason": "p99 latency over SLO since 14:02",
    "incident": {"id": "INC-42", "severity": "sev2", "class": "capacity-saturation",
                 "tier": "critical"},
}  # fmt: skip
BLOCKED = {
    "action": "drain_node",
    "target": "node-7",
    "environment": "prod",
    "params": {"node": "node-7"},
    "reason": "kernel soft lockups on node-7",
    "incident": {"id": "INC-43", "severity": "sev3", "class": "node-failure", "tier": "standard"},
}


@pytest.fixture
def env(sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    """Only what the server needs; no OPSGATE_* of the developer's shell leaks in."""
    return {
        "OPSGATE_DB": sqlite_url,
        "OPSGATE_CATALOG": str(ROOT / "catalog"),
        "OPSGATE_POLICIES": str(ROOT / "policies"),
        "OPSGATE_CONFIG": str(tmp_path / "absent.toml"),
        "OPSGATE_AGENT_ID": "sre-agent",
    }


def opsgate(env: Mapping[str, str], *args: str) -> Any:
    """Run the `opsgate` CLI as a user would and parse its JSON output."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")}
    done = subprocess.run(
        [sys.executable, "-m", "opsgate", *args],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def over_stdio(
    env: Mapping[str, str], log: Path, scenario: Callable[[ClientSession], Awaitable[None]]
) -> None:
    """Start `python -m opsgate mcp`, run the scenario in an initialized session, stop it."""
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "opsgate", "mcp"], env=dict(env), cwd=ROOT
    )

    async def main() -> None:
        with log.open("w") as errlog:
            # Leaving the context closes stdin; the SDK kills the server if it lingers.
            async with (
                stdio_client(params, errlog=errlog) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                await scenario(session)

    try:
        anyio.run(main)
    except Exception as exc:
        # "Connection closed" alone says nothing: the server's stderr says why it broke.
        raise AssertionError(f"{exc!r}; server stderr:\n{log.read_text()}") from exc


def structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    return result.structured_content


def error_text(result: CallToolResult) -> str:
    assert result.is_error, result.structured_content
    block = result.content[0]
    assert block.type == "text"
    return block.text


def test_an_agent_proposes_and_follows_over_stdio(
    env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    # A human's blocked proposal on the same store, so the report has both kinds.
    config = CliConfig(
        Settings(db=sqlite_url, catalog=ROOT / "catalog", policies=ROOT / "policies")
    )
    try:
        human = config.gate.propose(BLOCKED, Identity(id="alice", kind="human"))
    finally:
        config.close()
    assert human.action.state.value == "blocked"
    ids: dict[str, str] = {}

    async def scenario(session: ClientSession) -> None:
        tools = (await session.list_tools()).tools
        names = {t.name for t in tools}
        assert names >= EXPECTED_TOOLS
        assert not [n for n in names if any(verb in n.lower() for verb in FORBIDDEN)]

        allowed = structured(await session.call_tool("propose_action", ALLOWED))
        assert allowed["state"] == "pending_approval" and allowed["allowed"] is True
        assert allowed["proposer"] == {"id": "sre-agent", "kind": "agent"}
        # two for a critical tier in prod, one more: the agent is on probation (trust ladder)
        assert allowed["required_approvals"] == 3
        blocked = structured(await session.call_tool("propose_action", BLOCKED))
        assert blocked["state"] == "blocked" and blocked["allowed"] is False
        codes = [d["code"] for d in blocked["deny"]]
        assert "not_allowlisted" in codes
        assert all(d["message"] for d in blocked["deny"])
        bounds = structured(
            await session.call_tool(
                "propose_action", {**ALLOWED, "params": {"deployment": "checkout", "replicas": 500}}
            )
        )
        assert [d["code"] for d in bounds["deny"]] == ["param_out_of_bounds"]
        ids.update(allowed=allowed["id"], blocked=blocked["id"], bounds=bounds["id"])

        got = structured(await session.call_tool("get_action", {"action_id": allowed["id"]}))
        assert got["state"] == "pending_approval"
        assert got["action"]["params"]["replicas"] == 6
        assert got["approvals"] == {
            "count": 0, "required": 3, "roles": ["sre-lead", "sre"], "by": [],
        }  # fmt: skip
        assert got["execution"] is None and got["measurements"]["total"] == 0

        explained = structured(
            await session.call_tool("explain_decision", {"action_id": blocked["id"]})
        )
        (decision,) = explained["decisions"]
        assert [d["code"] for d in decision["deny"]] == codes
        proposer = decision["input"]["proposer"]
        assert (proposer["id"], proposer["kind"]) == ("sre-agent", "agent")
        assert proposer["track_record"]["overall"]["proposals"] >= 1
        assert decision["input"]["action"]["type"] == "drain_node"
        assert decision["input"]["action"]["environment"] == "prod"

        mine = structured(await session.call_tool("list_my_actions", {}))
        assert [a["id"] for a in mine["actions"]] == [bounds["id"], blocked["id"], allowed["id"]]

        catalog = await session.read_resource("opsgate://catalog")
        assert "scale_deployment" in catalog.contents[0].text  # type: ignore[union-attr]

    over_stdio(env, tmp_path / "server.log", scenario)
    assert "serving stdio as agent sre-agent" in (tmp_path / "server.log").read_text()

    # What the humans see: the MCP proposal waits for them, marked as an agent's.
    queue = opsgate(env, "queue", "--json")
    assert [a["id"] for a in queue] == [ids["allowed"]]
    assert queue[0]["proposer"] == {"id": "sre-agent", "kind": "agent"}

    # The governance report counts the agent's blocks apart from the human's.
    report = opsgate(env, "report", "blocks", "--by", "proposer_kind", "--format", "json")
    (table,) = [t for t in report["tables"] if t["name"] == "blocks_propose"]
    rows = {row["segment"]: row for row in table["rows"]}
    assert rows["agent"]["decided"] == 3 and rows["agent"]["blocked"] == 2
    assert rows["human"]["decided"] == 1 and rows["human"]["blocked"] == 1
    assert "param_out_of_bounds" in rows["agent"]["top_codes"]


def test_malformed_arguments_are_tool_errors_and_store_nothing(
    env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    store = SqlStore(sqlite_url)
    before = store.row_counts()

    async def scenario(session: ClientSession) -> None:
        missing = {k: v for k, v in ALLOWED.items() if k != "environment"}
        cases = [
            ({**ALLOWED, "action": "reboot_the_world"}, "action: unknown action type"),
            ({**ALLOWED, "params": {"deployment": "checkout", "replicas": "six"}},
             "params.replicas: expected an integer"),
            ({**ALLOWED, "params": {"deployment": "checkout", "replicas": 5000}},
             "params.replicas: 5000 is above the maximum"),
            (missing, "environment: required field missing"),
            ({**ALLOWED, "incident": {"severity": "sev9"}}, "incident.severity:"),
            ({**ALLOWED, "verification": {"hold": "0s"}}, "verification: unknown field"),
        ]  # fmt: skip
        for arguments, expected in cases:
            result = await session.call_tool("propose_action", arguments)
            assert error_text(result).startswith(expected), error_text(result)
        result = await session.call_tool("get_action", {})
        assert error_text(result) == "action_id: required field missing"
        result = await session.call_tool("get_action", {"action_id": "01JXNOSUCHACTION0000000000"})
        assert error_text(result).startswith("action_id: no action")

    try:
        over_stdio(env, tmp_path / "server.log", scenario)
        assert store.row_counts() == before
    finally:
        store.close()


def _read_line(stream: IO[str], pattern: str, timeout: float) -> re.Match[str]:
    """The first stderr line matching `pattern`, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                break
            line = stream.readline()
            if not line:
                break
            seen.append(line)
            if match := re.search(pattern, line):
                return match
    raise AssertionError(f"no line matching {pattern!r} in: {''.join(seen)!r}")


@pytest.fixture
def http_server(env: dict[str, str]) -> Iterator[str]:
    """`opsgate mcp --http 0` on loopback; its URL. Stopped (SIGTERM, then kill) after."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "opsgate", "mcp", "--http", "0"],
        env={**clean, **env},
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    try:
        match = _read_line(process.stderr, r"(http://127\.0\.0\.1:\d+/mcp)", timeout=30)
        yield match.group(1)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stderr.close()


def test_streamable_http_on_loopback(http_server: str) -> None:
    async def main() -> None:
        async with Client(http_server) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert names == EXPECTED_TOOLS
            proposed = structured(await client.call_tool("propose_action", ALLOWED))
            assert proposed["proposer"] == {"id": "sre-agent", "kind": "agent"}
            mine = structured(await client.call_tool("list_my_actions", {}))
            assert [a["id"] for a in mine["actions"]] == [proposed["id"]]

    anyio.run(main)
