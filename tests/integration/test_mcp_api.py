"""`opsgate mcp` through `opsgate server` with an agent token: the MCP process holds no
database credentials and cannot choose who it is; the server decides and records."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp import ClientSession

from tests.integration.api_server import run_cli
from tests.integration.test_mcp import ALLOWED, BLOCKED, over_stdio, structured
from tests.integration.test_server import Rig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("mcp-api"))
    rig.tokens = {
        "agent": rig.token("sre-agent", "--kind", "agent"),
        "alice": rig.token("alice", "--kind", "human"),
    }
    rig.server.start()
    try:
        yield rig
    finally:
        rig.server.stop()
        rig.store.close()


def client_env(rig: Rig, token: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")}
    return {
        **env,
        "OPSGATE_URL": rig.server.url,
        "OPSGATE_TOKEN": token,
        "OPSGATE_CONFIG": str(tmp_path / "absent.toml"),
        "OPSGATE_AGENT_ID": "alice",  # ignored through the server: the token decides
    }


def test_an_agent_proposes_and_follows_through_the_server(rig: Rig, tmp_path: Path) -> None:
    env = client_env(rig, rig.tokens["agent"], tmp_path)
    assert "OPSGATE_DB" not in env
    ids: dict[str, str] = {}

    async def scenario(session: ClientSession) -> None:
        types = structured(await session.call_tool("list_action_types", {}))
        assert types["proposer"] == {"id": "sre-agent", "kind": "agent"}
        assert "scale_deployment" in [t["name"] for t in types["action_types"]]

        allowed = structured(await session.call_tool("propose_action", ALLOWED))
        assert allowed["state"] == "pending_approval"
        assert allowed["proposer"] == {"id": "sre-agent", "kind": "agent"}
        blocked = structured(await session.call_tool("propose_action", BLOCKED))
        assert blocked["state"] == "blocked" and "not_allowlisted" in [
            d["code"] for d in blocked["deny"]
        ]
        ids.update(allowed=allowed["id"], blocked=blocked["id"])

        got = structured(await session.call_tool("get_action", {"action_id": allowed["id"]}))
        assert got["state"] == "pending_approval" and got["action"]["params"]["replicas"] == 6

        explained = structured(
            await session.call_tool("explain_decision", {"action_id": blocked["id"]})
        )
        assert explained["bundle_changed_since"] is False
        assert explained["decisions"][0]["input"]["proposer"]["id"] == "sre-agent"

        mine = structured(await session.call_tool("list_my_actions", {}))
        assert [a["id"] for a in mine["actions"]] == [blocked["id"], allowed["id"]]
        pending = structured(
            await session.call_tool("list_my_actions", {"states": ["pending_approval"]})
        )
        assert [a["id"] for a in pending["actions"]] == [allowed["id"]]

        revision = await session.read_resource("opsgate://policy/revision")
        assert "sha256:" in revision.contents[0].text  # type: ignore[union-attr]

    over_stdio(env, tmp_path / "mcp.log", scenario)
    assert "serving stdio as agent sre-agent" in (tmp_path / "mcp.log").read_text()

    # On the server's store, as the agent's and nobody else's.
    stored = rig.store.get_action(ids["allowed"])
    assert stored is not None and stored.proposer.id == "sre-agent"
    assert stored.proposer.kind == "agent"


def test_an_action_of_someone_else_is_not_found_over_mcp(rig: Rig, tmp_path: Path) -> None:
    human = rig.call("POST", "/actions", rig.tokens["alice"], ALLOWED)[1]["action"]["id"]
    env = client_env(rig, rig.tokens["agent"], tmp_path)

    async def scenario(session: ClientSession) -> None:
        result = await session.call_tool("get_action", {"action_id": human})
        assert result.is_error
        assert "no action" in result.content[0].text  # type: ignore[union-attr]

    over_stdio(env, tmp_path / "mcp.log", scenario)


def test_mcp_refuses_a_human_token(rig: Rig, tmp_path: Path) -> None:
    env = client_env(rig, rig.tokens["alice"], tmp_path)
    done = run_cli(env, "mcp", cwd=tmp_path)
    assert done.returncode == 2
    assert "opsgate mcp needs an agent token" in done.stderr
    assert done.stderr.count("\n") == 1
