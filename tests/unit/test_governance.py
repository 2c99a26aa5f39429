"""Governance numbers people can trust: typos are invalid input, not policy blocks; manual
rollbacks apart from automatic ones; figures over too few runs say so."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from opsgate.catalog import load_catalog
from opsgate.cli import cli as opsgate_cli
from opsgate.errors import InvalidInput
from opsgate.gate import Gate
from opsgate.models import Identity
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.policies.engine import bundle_environments
from opsgate.store import open_store
from opsgate.testing import MemoryStore
from tests import history
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


NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def history_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[history.Record]]:
    """A seeded history in which every third rollback was asked for by a person."""
    url = f"sqlite:///{tmp_path_factory.mktemp('governance')}/history.db"
    store = open_store(url)
    store.migrate()
    records = history.generate(600, seed=11, start=NOW - timedelta(days=20), end=NOW)
    rolled = [r for r in records if r.execution and r.execution.rollback_decided_at]
    for record in rolled[::3]:
        assert record.execution is not None
        record.execution = record.execution.model_copy(update={"rollback_requested_by": "bob"})
    history.write(store, records)
    store.close()
    return url, records


def report_json(url: str, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(opsgate_cli, ["--db", url, "report", *args, "--json"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def test_manual_rollbacks_are_reported_apart(
    history_db: tuple[str, list[history.Record]],
) -> None:
    url, records = history_db
    since, until = NOW - timedelta(days=30), NOW + timedelta(seconds=1)
    manual = [r for r in records if r.execution and r.execution.rollback_requested_by]
    automatic = [
        r
        for r in records
        if r.execution and r.execution.rollback_decided_at and not r.execution.rollback_requested_by
    ]
    assert manual and automatic
    document = report_json(url, "rollbacks", "--since", "30d")
    tables = {t["name"]: t["rows"] for t in document["tables"]}
    [auto_row] = tables["rollbacks"]
    [manual_row] = tables["manual_rollbacks"]
    truth_auto = history.truth_rollbacks(automatic, since, until)["all"]
    truth_manual = history.truth_rollbacks(manual, since, until)["all"]
    assert auto_row["decided"] == truth_auto["decided"]
    assert auto_row["verified"] == len(truth_auto["durations"])
    assert auto_row["p90"] == pytest.approx(
        history.percentile(truth_auto["durations"], 0.9), abs=1e-3
    )
    assert manual_row["decided"] == truth_manual["decided"] == len(manual)
    assert f"{len(manual)} manual rollback(s)" in " ".join(document["headline"])


def test_too_few_runs_to_judge(history_db: tuple[str, list[history.Record]]) -> None:
    url, _ = history_db
    plenty = report_json(url, "verification", "--since", "30d", "--min-runs", "1")
    [row] = plenty["tables"][0]["rows"]
    assert row["too_few_runs"] is False and row["finished"] > 10
    few = report_json(url, "verification", "--since", "30d", "--min-runs", "100000")
    [row] = few["tables"][0]["rows"]
    assert row["too_few_runs"] is True and isinstance(row["pass_rate"], float)
    assert any("Too few runs to judge" in h for h in few["headline"])
    assert not any("Pass rate fell" in h or "Pass rate rose" in h for h in few["headline"])
    # People read the caveat in place of the bare figure.
    result = CliRunner().invoke(
        opsgate_cli,
        ["--db", url, "report", "rollbacks", "--since", "30d", "--format", "markdown"],
        env={"OPSGATE_REPORT_MIN_RUNS": "100000"},
    )
    assert result.exit_code == 0, result.output
    assert "too few to judge (fewer than 100000)" in result.stdout
    bad = CliRunner().invoke(opsgate_cli, ["--db", url, "report", "--min-runs", "0"])
    assert bad.exit_code == 2
