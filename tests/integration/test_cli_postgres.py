"""Team mode on the real PostgreSQL server: `opsgate server` holds the database; people
hold API tokens and use the unchanged commands through it. Nobody names who they are."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from opsgate.store.sql import SqlStore
from tests.integration.api_server import ROOT, ApiServer, run_cli

pytestmark = pytest.mark.integration

SCALE = [
    "propose", "scale_deployment", "--target", "checkout", "--env", "prod",
    "--param", "deployment=checkout", "--param", "replicas=12", "--reason", "p99 over SLO",
    "--tier", "standard",
]  # fmt: skip


def test_team_mode_through_the_server_on_postgresql(
    pg_database: Callable[[], str], tmp_path: Path
) -> None:
    url = pg_database()
    server_side = {
        "OPSGATE_DB": url,
        "OPSGATE_CATALOG": str(ROOT / "catalog"),
        "OPSGATE_POLICIES": str(ROOT / "policies"),
        "OPSGATE_CONFIG": str(tmp_path / "absent.toml"),
        "OPSGATE_IDENTITY": "postgres",  # the administrator is the database's session_user
    }
    assert run_cli(server_side, "init").returncode == 0
    tokens = {}
    for who in ("alice", "bob"):
        done = run_cli(server_side, "token", "create", "--principal", who, "--kind", "human",
                       "--json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        created = json.loads(done.stdout)
        assert created["created_by"] == make_url(url).username
        tokens[who] = created["token"]

    server = ApiServer(server_side)
    server.start()
    store = SqlStore(url)
    try:

        def client(who: str, *args: str, **extra: str) -> tuple[int, str, str]:
            env = {
                "OPSGATE_URL": server.url,
                "OPSGATE_TOKEN": tokens[who],
                "OPSGATE_CONFIG": str(tmp_path / "absent.toml"),
                **extra,
            }
            done = run_cli(env, *args, cwd=tmp_path)
            return done.returncode, done.stdout, done.stderr

        code, out, err = client("alice", *SCALE, "--json")
        assert code == 0, err
        action_id = json.loads(out)["action"]["id"]

        # Posing on the shared store is refused outright, and changes nothing.
        before = store.row_counts()
        posing = {**server_side, "OPSGATE_IDENTITY": "env", "OPSGATE_USER": "bob"}
        done = run_cli(posing, "approve", action_id)
        assert done.returncode == 2 and "OPSGATE_IDENTITY=env is refused" in done.stderr
        assert store.row_counts() == before

        code, out, err = client("bob", "approve", action_id, "--json")
        assert code == 0, err
        document = json.loads(out)
        assert document["action"]["state"] == "approved"
        assert document["approvals"][0]["approver"] == {"id": "bob", "kind": "human"}

        # OPSGATE_USER, LOGNAME and USER mean nothing to a client: its token decides.
        code, out, _ = client("bob", "show", action_id, "--json", OPSGATE_USER="carol",
                              LOGNAME="carol", USER="carol")  # fmt: skip
        assert code == 0
        assert [e["actor"] for e in json.loads(out)["events"]] == ["alice", "bob", "bob"]

        code, out, _ = client("alice", "propose", "drain_node", "--target", "node-1", "--env",
                              "prod", "--param", "node=node-1", "--reason", "disk")  # fmt: skip
        assert code == 3 and "not_allowlisted" in out

        bad = [*SCALE[:9], "replicas=lots", *SCALE[10:]]
        code, _, err = client("alice", *bad)
        assert code == 2
        assert err.strip() == "error: params.replicas: expected an integer"

        verified = run_cli(server_side, "audit", "verify")
        assert verified.returncode == 0, verified.stderr
        # two token.created, proposed, approval.added, approved, and the blocked proposal
        assert "audit chain ok: 6 events" in verified.stdout
    finally:
        server.stop()
        store.close()
