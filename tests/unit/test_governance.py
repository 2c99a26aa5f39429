"""Governance numbers people can trust: typos are invalid input, not policy blocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsgate.catalog import load_catalog
from opsgate.cli.context import bundle_environments
from opsgate.errors import InvalidInput
from opsgate.gate import Gate
from opsgate.models import Identity
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.testing import MemoryStore
from tests.unit.test_cli import ROOT, SCALE, Cli


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    runner = Cli(monkeypatch, capsys, tmp_path / "opsgate.db")
    code, _, err = runner("init")
    assert code == 0, err
    return runner


def test_an_unknown_environment_is_invalid_input_and_stores_nothing(cli: Cli) -> None:
    before = cli.rows()
    for env, hint in (("prd", "did you mean 'prod'"), ("stagng", "did you mean 'staging'")):
        args = [a if a != "prod" else env for a in SCALE]
        code, out, err = cli(*args)
        assert code == 2 and out == ""
        assert err.startswith(f"error: environment: unknown environment '{env}'") and hint in err
        assert "dev, prod, staging" in err
        code, _, err = cli("policy", "eval", *args[1:])
        assert code == 2 and "unknown environment" in err
    code, _, err = cli(*[a if a != "prod" else "qa" for a in SCALE])
    assert code == 2 and "did you mean" not in err
    assert cli.rows() == before  # no action, no decision: no block to count


def test_bundle_environments_come_from_its_data(tmp_path: Path) -> None:
    assert bundle_environments(ROOT / "policies") == frozenset({"prod", "staging", "dev"})
    (tmp_path / "data.json").write_text(
        '{"allowlist": {"eu-prod": []}, "approver_roles": {"default": ["sre"], "us-prod": ["sre"]}}'
    )
    assert bundle_environments(tmp_path) == frozenset({"eu-prod", "us-prod"})
    (tmp_path / "data.json").write_text("{}")
    assert bundle_environments(tmp_path) is None  # the bundle names none: policy decides
    (tmp_path / "data.json").write_text("{not json")
    assert bundle_environments(tmp_path) is None  # unreadable: policy fails closed


def test_the_gate_refuses_before_deciding() -> None:
    store = MemoryStore()
    gate = Gate(
        store=store,
        catalog=load_catalog(ROOT / "catalog"),
        engine=EmbeddedEngine(ROOT / "policies"),
        environments=lambda: frozenset({"prod"}),
    )
    document = {
        "action": "restart_service",
        "target": "web",
        "environment": "prdo",
        "params": {"deployment": "web"},
        "reason": "r",
    }
    with pytest.raises(InvalidInput, match="did you mean 'prod'"):
        gate.propose(document, Identity(id="alice", kind="human"))
    with pytest.raises(InvalidInput):
        gate.dry_run(document, Identity(id="alice", kind="human"))
    assert store.row_counts() == {k: 0 for k in store.row_counts()}
