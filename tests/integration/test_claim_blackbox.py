"""Black-box: a raw `UPDATE actions SET state='approved'` then `opsgate run` runs nothing,
on SQLite and on PostgreSQL; a genuine approval runs, and records who ran it."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from opsgate.catalog import load_catalog
from opsgate.gate import Gate
from opsgate.models import Identity
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.store import open_store
from tests.integration.execution_rig import clean_env, opsgate, policies_granting


def touch_type() -> dict[str, Any]:
    """A change whose only effect is a file appearing: proof of whether `run` ran."""
    return {
        "name": "restart_service",
        "risk": "low",
        "params": {"marker": {"type": "string", "pattern": r"^/[A-Za-z0-9_./-]+$"}},
        "run": {"argv": [sys.executable, "-c", "import sys; open(sys.argv[1], 'w')", "{marker}"]},
        "undo": {
            "argv": [sys.executable, "-c", "import os, sys; os.remove(sys.argv[1])", "{marker}"]
        },
        "verification": {
            "interval": "1s",
            "hold": "1s",
            "timeout": "5s",
            "signals": [{"name": "up", "query": 'up{job="{target}"}', "pass": {"min": 1}}],
            "stop_conditions": [
                {"name": "down", "query": 'up{job="{target}"}', "halt": {"max": 0}}
            ],
        },
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, pg_database: Callable[[], str], tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'opsgate.db'}"
    return pg_database()


def test_a_raw_state_update_then_run_is_blocked_and_runs_nothing(
    db_url: str, tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "restart_service.yaml").write_text(json.dumps(touch_type()))
    # Who runs: on SQLite (single-user local mode) a named local user; on PostgreSQL never a
    # self-asserted name but the database's session user, given the sre role in a copy of
    # the bundle. People propose through the gate (through `opsgate server` in team mode).
    postgres = db_url.startswith("postgresql")
    operator = (make_url(db_url).username or "postgres") if postgres else "alice"
    policies = policies_granting(tmp_path, operator)
    env = {
        **clean_env(),
        "OPSGATE_DB": db_url,
        "OPSGATE_CATALOG": str(catalog),
        "OPSGATE_POLICIES": str(policies),
        # Nothing listens there: a blocked claim must not need to measure anything.
        "OPSGATE_PROMETHEUS_URL": "http://127.0.0.1:9",
    }
    runner = (
        {**env, "OPSGATE_IDENTITY": "postgres"}
        if postgres
        else {**env, "OPSGATE_IDENTITY": "env", "OPSGATE_USER": operator}
    )
    assert opsgate(env, "init").returncode == 0
    marker = tmp_path / "ran"
    store = open_store(db_url)
    try:
        gate = Gate(store=store, catalog=load_catalog(catalog), engine=EmbeddedEngine(policies))
        proposed = gate.propose(
            {
                "action": "restart_service",
                "target": "checkout",
                "environment": "staging",
                "params": {"marker": str(marker)},
                "reason": "forged approval test",
            },
            Identity(id="carol", kind="human"),
        )
    finally:
        store.close()
    assert proposed.action.state.value == "pending_approval", proposed.decision.deny
    action_id = proposed.action.id

    engine = create_engine(db_url)
    with engine.begin() as conn:  # an insider with write access to the table
        conn.execute(
            text("UPDATE actions SET state = 'approved' WHERE id = :id"), {"id": action_id}
        )
    engine.dispose()

    ran = opsgate(runner, "run", action_id)
    assert ran.returncode == 3, ran.stdout + ran.stderr
    assert "approval_missing" in ran.stderr or "valid approvals: 0 of 1" in ran.stderr
    assert not marker.exists()
    shown = json.loads(opsgate(runner, "show", action_id, "--json").stdout)
    assert shown["action"]["state"] == "blocked_at_execution"
    blocked = [e for e in shown["events"] if e["kind"] == "action.blocked_at_execution"]
    assert blocked[0]["data"]["deny"] == ["approval_missing"]
    assert blocked[0]["data"]["triggered_by"] == operator
    assert opsgate(runner, "run", action_id).returncode == 5  # and it stays blocked
    assert not marker.exists()
