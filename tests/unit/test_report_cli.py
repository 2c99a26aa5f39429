"""`opsgate report` over a seeded SQLite history: every format, bad input, the story."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from opsgate.cli import cli
from opsgate.store import open_store
from tests import history

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('report')}/history.db"
    store = open_store(url)
    store.migrate()
    records = history.generate(2000, seed=5, start=NOW - timedelta(days=60), end=NOW)
    # In the last 30 days deploy-related sev2 runs are halted by error_spike.
    for record in records:
        e = record.execution
        if (
            e is not None
            and e.run_started_at is not None
            and e.run_started_at > NOW - timedelta(days=30)
            and record.segments["incident_class"] == "deploy-related"
            and record.segments["severity"] == "sev2"
            and e.outcome == "succeeded"
        ):
            record.execution = e.model_copy(
                update={
                    "outcome": "stopped",
                    "trigger_name": "error_spike",
                    "rollback_decided_at": e.run_started_at + timedelta(seconds=30),
                    "rollback_verified_at": e.run_started_at + timedelta(seconds=90),
                }
            )
    history.write(store, records)
    store.close()
    return url


def report(db: str, *args: str) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(cli, ["--db", db, "report", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_the_summary_names_what_moved_and_where(db: str) -> None:
    code, out, _ = report(db, "verification", "--format", "json")
    assert code == 0
    document = json.loads(out)
    story = " ".join(document["headline"])
    assert "Pass rate fell" in story
    assert "deploy-related sev2 actions halted by error_spike" in story
    table = document["tables"][0]
    assert table["columns"][:5] == ["segment", "started", "finished", "succeeded", "pass rate"]
    assert table["keys"][:5] == ["segment", "started", "finished", "succeeded", "pass_rate"]
    [row] = table["rows"]
    assert 0 <= row["pass_rate"] <= 1  # tools get raw fractions, people get percentages
    assert isinstance(row["started"], int)
    # A count per stop condition is an object, not a sentence.
    stops = row["stops_by_name"]
    assert set(stops) == {"error_spike", "latency_spike"}
    assert sum(stops.values()) == row["stopped"] and all(isinstance(n, int) for n in stops.values())


def test_every_format(db: str, tmp_path: Path) -> None:
    code, out, _ = report(db, "blocks", "--by", "code", "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0])[:3] == ["table", "code", "decisions_with_code"]
    assert {r["table"] for r in rows} == {"blocks_propose", "blocks_execute"}
    # One header for the whole file: no header rows repeated as data.
    assert all(r["code"] != "code" for r in rows)
    code, out, _ = report(
        db, "blocks", "--by", "code", "--format", "csv", "--table", "blocks_execute"
    )
    only = list(csv.DictReader(io.StringIO(out)))
    assert only and "table" not in only[0] and next(iter(only[0])) == "code"
    code, out, _ = report(db, "rollbacks", "--by", "tier", "--format", "markdown")
    assert code == 0 and out.startswith("## Rollback time") and "| segment |" in out
    code, out, _ = report(db, "approvals", "--by", "proposer_kind")
    assert code == 0 and "Time to approval p90" in out and "agent" in out
    target = tmp_path / "r.html"
    code, _, err = report(db, "--format", "html", "-o", str(target))
    assert code == 0 and "wrote" in err
    assert target.read_text().startswith("<!DOCTYPE html>")


def test_filters_answer_one_question(db: str) -> None:
    args = ["--where", "incident_class=deploy-related", "--where", "severity=sev2"]
    code, out, _ = report(db, "verification", *args, "--by", "tier", "--format", "json")
    assert code == 0
    document = json.loads(out)
    assert document["where"] == {"incident_class": "deploy-related", "severity": "sev2"}
    tiers = {row["segment"] for row in document["tables"][0]["rows"]}
    assert tiers <= {"critical", "standard", "internal"} and tiers


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--since", "yesterday-ish"], "--since"),
        (["--since", "1d", "--until", "2d"], "--since"),
        (["--where", "colour=red"], "--where"),
        (["verification", "--by", "code"], "--by"),
        (["--where", "environment=prd"], "--where"),
        (["--where", "enviroment=prod"], "--where"),
        (["--table", "nope"], "--table"),
    ],
)
def test_bad_input_is_exit_2_naming_the_field(db: str, args: list[str], field: str) -> None:
    import contextlib

    from opsgate.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--db", db, "report", *args])
    assert code == 2
    assert err.getvalue().startswith(f"error: {field}")
