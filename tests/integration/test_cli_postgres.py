"""Team mode on the real PostgreSQL server: `opsgate server` holds the database; people
hold API tokens and use the unchanged commands through it. Nobody names who they are."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError

from opsgate.store.sql import SqlStore
from tests.integration.api_server import ROOT, ApiServer, run_cli
from tests.integration.execution_rig import action_type, set_fault
from tests.integration.fault_service import FaultService
from tests.integration.prom import PrometheusServer

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


GRANTS = ROOT / "scripts" / "postgres-grants.sql"


def test_server_and_worker_work_with_only_the_shipped_grants(
    pg_database: Callable[[], str],
    tmp_path: Path,
    prometheus: PrometheusServer,
    fault_service: FaultService,
) -> None:
    """scripts/postgres-grants.sql is enough for the server and a worker, and no more."""
    url = pg_database()
    suffix = uuid.uuid4().hex[:8]  # roles are cluster-wide: never clash with another run
    server_role, worker_role = f"opsgate_server_{suffix}", f"opsgate_worker_{suffix}"
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    document = action_type("restart_service", run=set_fault("0"), undo=set_fault("0"), hold="1s")
    (catalog / "restart_service.yaml").write_text(json.dumps(document))
    owner = {
        "OPSGATE_DB": url,
        "OPSGATE_CATALOG": str(catalog),
        "OPSGATE_POLICIES": str(ROOT / "policies"),
        "OPSGATE_CONFIG": str(tmp_path / "absent.toml"),
        "OPSGATE_IDENTITY": "postgres",
    }
    assert run_cli(owner, "init").returncode == 0
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    sql = GRANTS.read_text().replace("opsgate_server", server_role)
    sql = sql.replace("opsgate_worker", worker_role)
    sql = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    statements = [s for s in sql.split(";") if s.strip()]
    server = None
    try:
        with admin.connect() as conn:
            for role in (server_role, worker_role):
                conn.execute(text(f"CREATE ROLE {role} LOGIN"))
            for statement in statements:
                conn.execute(text(statement))
        as_role = {
            role: make_url(url).set(username=role).render_as_string(hide_password=False)
            for role in (server_role, worker_role)
        }
        done = run_cli(owner, "token", "create", "--principal", "alice", "--kind", "human")
        alice = done.stdout.strip()
        bob = run_cli(owner, "token", "create", "--principal", "bob", "--kind", "human")
        # The server's own executor runs too (`opsgate run` through it): its runner steps
        # import tests.integration, so it runs from the repo root.
        server_env = {
            **owner,
            "OPSGATE_DB": as_role[server_role],
            "OPSGATE_IDENTITY": "os",
            "OPSGATE_PROMETHEUS_URL": prometheus.url,
            "PYTHONPATH": str(ROOT),
        }
        server = ApiServer(server_env)
        server.start()
        fault_service.add_service("granted")
        proposal = {
            "action": "restart_service", "target": "granted", "environment": "staging",
            "params": {"fault_url": fault_service.url}, "reason": "grants test",
        }  # fmt: skip
        status, body = server.call("POST", "/api/v1/actions", alice, proposal)
        assert status == 201, body
        action_id = body["action"]["id"]
        status, body = server.call("POST", f"/api/v1/actions/{action_id}/approve",
                                   bob.stdout.strip(), {})  # fmt: skip
        assert status == 200 and body["action"]["state"] == "approved", body

        worker_env = {
            **owner,
            "OPSGATE_DB": as_role[worker_role],
            "OPSGATE_IDENTITY": "os",
            "OPSGATE_PROMETHEUS_URL": prometheus.url,
        }
        worked = run_cli(worker_env, "worker", "--once")
        assert worked.returncode == 0, worked.stderr
        status, body = server.call("GET", f"/api/v1/actions/{action_id}", alice)
        assert body["action"]["state"] == "succeeded", body["action"]

        # The server's executor, a worker principal of its own, with the server's grants.
        status, body = server.call("POST", "/api/v1/actions", alice, proposal)
        assert status == 201, body
        second = body["action"]["id"]
        status, body = server.call("POST", f"/api/v1/actions/{second}/approve",
                                   bob.stdout.strip(), {})  # fmt: skip
        assert status == 200, body
        client = {"OPSGATE_URL": server.url, "OPSGATE_TOKEN": bob.stdout.strip()}
        ran = run_cli(client, "run", second, cwd=tmp_path)
        assert ran.returncode == 0 and f"action {second} succeeded" in ran.stdout, ran.stderr
        # A lead resets trust through the server: the server role appends the reset.
        carol = run_cli(owner, "token", "create", "--principal", "carol", "--kind", "human")
        lead = {**client, "OPSGATE_TOKEN": carol.stdout.strip()}
        reset = ["trust", "reset", "--proposer", "alice", "--action-type", "restart_service",
                 "--reason", "grants test", "--json"]  # fmt: skip
        done = run_cli(lead, *reset, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["reset_by"] == "carol"
        verified = run_cli(client, "audit", "verify", cwd=tmp_path)
        assert verified.returncode == 0 and "audit chain ok" in verified.stdout, verified.stderr

        # No more than that: neither role mints tokens, deletes history or approves.
        for role, statement in [
            (server_role, "INSERT INTO api_tokens (id) VALUES ('x')"),
            (server_role, "DELETE FROM audit_events"),
            (worker_role, "SELECT count(*) FROM api_tokens"),
            (worker_role, "INSERT INTO approvals (id) VALUES ('x')"),
            (worker_role, "DELETE FROM actions"),
        ]:
            engine = create_engine(as_role[role])
            try:
                with (
                    pytest.raises(ProgrammingError, match="permission denied"),
                    engine.begin() as conn,
                ):
                    conn.execute(text(statement))
            finally:
                engine.dispose()
    finally:
        if server is not None:
            server.stop()
        with admin.connect() as conn:
            name = make_url(url).database
            for role in (server_role, worker_role):
                conn.execute(text(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}"))
                conn.execute(text(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}"))
                conn.execute(text(f'REVOKE ALL ON DATABASE "{name}" FROM {role}'))
                conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()
