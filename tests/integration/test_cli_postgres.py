"""The installed `opsgate` command against the real PostgreSQL server, in team mode:
PostgreSQL authenticates, and its session_user is who approves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[2]
OPSGATE = shutil.which("opsgate", path=str(Path(sys.executable).parent)) or "opsgate"
APPROVER_ROLE = "bob"  # in the default bundle's data.roles as an sre


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OPSGATE, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def team_db(pg_database: Any) -> Iterator[tuple[str, str]]:
    """A fresh database, and a login role `bob` that may use it (dropped afterwards)."""
    url = pg_database()
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        exists = conn.execute(
            text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": APPROVER_ROLE}
        ).first()
        created = exists is None
        if created:
            conn.execute(text(f"CREATE ROLE {APPROVER_ROLE} LOGIN"))
    bob_url = make_url(url).set(username=APPROVER_ROLE).render_as_string(hide_password=False)
    try:
        yield url, bob_url
    finally:
        with admin.connect() as conn:
            name = make_url(url).database
            conn.execute(text(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {APPROVER_ROLE}"))
            conn.execute(text(f'REVOKE ALL ON DATABASE "{name}" FROM {APPROVER_ROLE}'))
            if created:
                conn.execute(text(f"DROP OWNED BY {APPROVER_ROLE}"))
                conn.execute(text(f"DROP ROLE {APPROVER_ROLE}"))
        admin.dispose()


def test_team_mode_walkthrough_on_postgresql(team_db: tuple[str, str], tmp_path: Path) -> None:
    url, bob_url = team_db
    base = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")},
        "OPSGATE_CATALOG": str(ROOT / "catalog"),
        "OPSGATE_POLICIES": str(ROOT / "policies"),
    }
    alice = {**base, "OPSGATE_DB": url, "OPSGATE_IDENTITY": "env", "OPSGATE_USER": "alice"}
    done = run(alice, "init")
    assert done.returncode == 0, done.stderr
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(
            text(f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {APPROVER_ROLE}")
        )
    admin.dispose()

    proposed = run(
        alice,
        "propose",
        "scale_deployment",
        "--target",
        "checkout",
        "--env",
        "prod",
        "--param",
        "deployment=checkout",
        "--param",
        "replicas=12",
        "--reason",
        "p99 over SLO",
        "--tier",
        "standard",
        "--json",
    )
    assert proposed.returncode == 0, proposed.stderr
    action_id = json.loads(proposed.stdout)["action"]["id"]

    bob = {**base, "OPSGATE_DB": bob_url, "OPSGATE_IDENTITY": "postgres"}
    approved = run(bob, "approve", action_id, "--json")
    assert approved.returncode == 0, approved.stderr
    document = json.loads(approved.stdout)
    assert document["action"]["state"] == "approved"
    assert document["approvals"][0]["approver"] == {"id": "bob", "kind": "human"}

    # OPSGATE_USER is ignored unless OPSGATE_IDENTITY=env: no way to pose as someone else.
    posing = run({**bob, "OPSGATE_USER": "carol"}, "show", action_id, "--json")
    assert posing.returncode == 0
    shown = json.loads(posing.stdout)
    assert [e["actor"] for e in shown["events"]] == ["alice", "bob", "bob"]

    verified = run(alice, "audit", "verify")
    assert verified.returncode == 0 and "audit chain ok: 3 events" in verified.stdout

    blocked = run(
        alice,
        "propose",
        "drain_node",
        "--target",
        "node-1",
        "--env",
        "prod",
        "--param",
        "node=node-1",
        "--reason",
        "disk",
    )
    assert blocked.returncode == 3 and "not_allowlisted" in blocked.stdout

    bad = run(
        alice,
        "propose",
        "scale_deployment",
        "--target",
        "checkout",
        "--env",
        "prod",
        "--param",
        "deployment=checkout",
        "--param",
        "replicas=lots",
        "--reason",
        "x",
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: params.replicas: expected an integer"
