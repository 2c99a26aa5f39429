"""`opsgate report proposers`: the scorecard against ground truth counted straight from a
generated history, on SQLite and PostgreSQL, and the command in every format."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from opsgate.cli import main
from opsgate.reports.proposers import COLUMNS, proposers_report
from opsgate.reports.queries import ReportQueries, Window
from opsgate.store import Store
from opsgate.store.sql import SqlStore
from tests.unit.test_trust import NOW, ROOT, Spec, generate, load

WINDOW = Window(NOW - timedelta(days=30), NOW)


def truth(specs: list[Spec], window: Window, by_action: bool) -> dict[tuple[str, str], Any]:
    """Per (proposer, action or all): the scorecard's figures, counted from the specs."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for s in specs:
        if not window.since <= s.created < window.until:
            continue
        key = (s.proposer, s.action_type if by_action else "all")
        row = out.setdefault(
            key,
            {
                "proposals": 0,
                "blocked": 0,
                "blocks_by_code": {},
                "approved": 0,
                "rejected": 0,
                "runs": 0,
                "finished": 0,
                "verified_passes": 0,
                "stop_conditions": 0,
                "automatic_rollbacks": 0,
                "waited": 0,
            },
        )
        row["proposals"] += 1
        row["blocked"] += bool(s.codes)
        for code in s.codes:
            row["blocks_by_code"][code] = row["blocks_by_code"].get(code, 0) + 1
        row["waited"] += not s.codes
        row["approved"] += s.fate in ("approved", "ran")
        row["rejected"] += s.fate == "rejected"
        if s.fate == "ran":
            row["runs"] += 1
            row["finished"] += s.outcome is not None
            row["verified_passes"] += s.outcome == "succeeded"
            row["stop_conditions"] += s.outcome == "stopped"
            row["automatic_rollbacks"] += str(s.rollback).startswith("auto")
    for row in out.values():
        waited = row.pop("waited")
        row["block_rate"] = row["blocked"] / row["proposals"]
        row["approval_rate"] = row["approved"] / waited if waited else None
        row["pass_rate"] = row["verified_passes"] / row["finished"] if row["finished"] else None
    return out


def sql_only(store: Store) -> SqlStore:
    if not isinstance(store, SqlStore):
        pytest.skip("reports need a SQL store")
    return store


@pytest.mark.parametrize("by", [None, "action"])
def test_the_scorecard_matches_ground_truth(store: Store, by: str | None) -> None:
    sql = sql_only(store)
    specs = generate(7, 200)
    load(sql, specs)
    report = proposers_report(ReportQueries(sql), WINDOW, by, {}, min_runs=3)
    [table] = report.tables
    got = {}
    for record in table.records():
        key = (record["proposer"], record["action"])
        got[key] = {k: record[k] for k in truth(specs, WINDOW, False)[("agent-a", "all")]}
        before = record["pass_rate_before"]
        expected_before = truth(specs, WINDOW.previous(), by is not None).get(key, {})
        assert before == pytest.approx(expected_before.get("pass_rate"))
    expected = truth(specs, WINDOW, by is not None)
    for row in [*got.values(), *expected.values()]:
        for rate in ("block_rate", "approval_rate", "pass_rate"):
            if row[rate] is not None:
                row[rate] = pytest.approx(row[rate], abs=1e-6)
    assert got == expected
    assert "pass rate" in report.headline[0]


def test_only_agents_with_kind_agent(store: Store) -> None:
    sql = sql_only(store)
    specs = generate(8, 60)
    for s in specs[:10]:
        s.proposer = "alice"
    load(sql, specs)
    q = ReportQueries(sql)
    everyone = {r["proposer"] for r in proposers_report(q, WINDOW, None, {}).tables[0].records()}
    agents = proposers_report(q, WINDOW, None, {}, kind="agent").tables[0].records()
    # load() makes every proposer an agent; a human is one whose actions say so.
    assert {r["kind"] for r in agents} == {"agent"}
    assert {r["proposer"] for r in agents} <= everyone


def test_the_command_in_every_format(
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("OPSGATE_DB", sqlite_url)
    monkeypatch.setenv("OPSGATE_CATALOG", str(ROOT / "catalog"))
    monkeypatch.setenv("OPSGATE_POLICIES", str(ROOT / "policies"))
    store = SqlStore(sqlite_url)
    now_specs = generate(9, 80)
    shift = datetime.now(UTC) - NOW  # the command's window ends now
    for s in now_specs:
        s.created += shift
    load(store, now_specs)
    store.close()
    base = ["report", "proposers", "--since", "30d", "--kind", "agent", "--by", "action"]

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([*base, *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = run("--format", "json")
    assert code == 0, err
    document = json.loads(out)
    [table] = document["tables"]
    assert table["name"] == "proposers" and table["columns"] == COLUMNS
    rows = table["rows"]
    assert rows and all(row["kind"] == "agent" for row in rows)
    # Today's rung for each type and environment it proposed in, from the shipped bundle.
    assert any(row["rung"] for row in rows)
    assert set().union(*(row["rung"].values() for row in rows)) <= {
        "probation", "standard", "trusted", "revoked",
    }  # fmt: skip
    for fmt, marker in (("csv", "proposer"), ("markdown", "|"), ("html", "<table>")):
        code, out, err = run("--format", fmt)
        assert code == 0 and marker in out, err
    code, out, err = run("--format", "html", "-o", str(tmp_path / "p.html"))
    assert code == 0 and "Scorecard of agents" in (tmp_path / "p.html").read_text()
    code, out, err = run()
    assert code == 0 and "agents: verification pass rate" in out


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["report", "proposers", "--by", "severity"], "--by"),
        (["report", "blocks", "--kind", "agent"], "--kind"),
        (["report", "proposers", "--kind", "robot"], "kind"),
        (["report", "proposers", "--where", "proposer=x"], "--where"),
    ],
)
def test_bad_scorecard_flags_exit_2(
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    field: str,
) -> None:
    monkeypatch.setenv("OPSGATE_DB", sqlite_url)
    code = main(args)
    _, err = capsys.readouterr()
    assert code == 2 and field in err
