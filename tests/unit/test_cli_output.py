"""Output contracts: --json on every data command, JSON errors on stderr under --json with
the README's exit codes, "did you mean", and not-found exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_cli import ROOT, SCALE, Cli


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    runner = Cli(monkeypatch, capsys, tmp_path / "opsgate.db")
    code, _, err = runner("init")
    assert code == 0, err
    return runner


def json_error(err: str) -> dict[str, Any]:
    assert err.count("\n") == 1, err  # one line: one JSON object
    document = json.loads(err)
    assert set(document) == {"error"}
    error = document["error"]
    assert {"code", "message", "field", "exit_code"} <= set(error)
    return dict(error)


@pytest.mark.parametrize(
    ("args", "exit_code", "code", "field"),
    [
        (["show", "7ZZZZZZZ"], 4, "not_found", None),
        (["show", "ab"], 2, "invalid_input", "action_id"),
        (["show"], 2, "usage", "action_id"),
        (["list", "--state", "nope"], 2, "invalid_input", "--state"),
        (["list", "--limit", "-1"], 2, "usage", "--limit"),
        (["catalog", "show", "nope"], 4, "not_found", None),
        (["propose", "scale_deploymnt", "--target", "x", "--env", "prod", "--reason", "r"], 2,
         "invalid_input",
         "action"),
        (["audit", "export", "--format", "jsonl"], 2, "invalid_input", "--json"),
        (["report", "--where", "colour=red"], 2, "invalid_input", "--where"),
        (["policy", "replay", "--policies", "/nonexistent"], 2, "invalid_input", "--policies"),
    ],
)  # fmt: skip
def test_errors_under_json_are_json_with_the_same_exit_code(
    cli: Cli, args: list[str], exit_code: int, code: str, field: str | None
) -> None:
    before = cli.rows()
    status, out, err = cli(*args, "--json")
    assert status == exit_code and out == ""
    error = json_error(err)
    assert error["code"] == code and error["exit_code"] == exit_code
    assert error["field"] == field and error["message"]
    # Without --json the same failure is one plain line with the same exit code.
    plain_args = [a for a in args if a != "--json"]
    if "audit" not in args:  # that case only fails because --json conflicts
        status, _, err = cli(*plain_args)
        assert status == exit_code and err.startswith("error: ") and err.count("\n") == 1
    assert cli.rows() == before


def test_policy_refusal_under_json_keeps_data_on_stdout_and_exit_3(cli: Cli) -> None:
    first = cli.json(*SCALE)["action"]["id"]
    cli.as_user("bob")
    assert cli("approve", first)[0] == 0
    cli.as_user("alice")
    code, out, err = cli(*SCALE, "--json")
    assert code == 3 and err == ""
    document = json.loads(out)
    assert document["action"]["state"] == "blocked"
    [deny] = document["decision"]["deny"]
    assert deny["code"] == "concurrent_action" and first in deny["message"]


def test_json_errors_cannot_be_forged_by_values(cli: Cli) -> None:
    # A message carrying quotes, newlines or a fake JSON object stays one JSON string.
    forged = 'x", "code": "ok"}}\n{"error": {"code": "ok'
    code, _, err = cli("list", "--state", forged, "--json")
    assert code == 2
    error = json_error(err)
    assert error["code"] == "invalid_input" and error["field"] == "--state"


def test_json_on_audit_export_report_and_replay(cli: Cli, tmp_path: Path) -> None:
    action_id = cli.json(*SCALE)["action"]["id"]
    code, out, _ = cli("audit", "export", "--json")
    assert code == 0
    events = json.loads(out)
    assert [e["action_id"] for e in events] == [action_id]
    code, out, _ = cli("report", "--json")
    assert code == 0 and json.loads(out)["kind"] == "summary"
    code, out, _ = cli("policy", "replay", "--policies", str(ROOT / "policies"), "--json")
    assert code == 0 and json.loads(out)["replayed"] == 1
    code, _, err = cli("report", "--json", "--format", "csv")
    assert code == 2 and json_error(err)["field"] == "--json"


def test_did_you_mean(cli: Cli) -> None:
    code, _, err = cli("lsit")
    assert code == 2 and "no such command 'lsit'; did you mean 'list'?" in err
    code, _, err = cli("catalog", "show", "scale_deploy")
    assert code == 4 and "did you mean 'scale_deployment'" in err
    code, _, err = cli(
        "propose", "restart_servce", "--target", "web", "--env", "prod", "--reason", "r"
    )
    assert code == 2 and "did you mean 'restart_service'" in err
    args = [a if a != "replicas=12" else "replica=12" for a in SCALE]
    code, _, err = cli(*args)
    assert code == 2 and "params.replica" in err and "did you mean 'replicas'" in err
    cli.json(*SCALE)
    code, _, err = cli("report", "--where", "environment=prd")
    assert code == 2 and "did you mean 'prod'" in err
    code, _, err = cli("report", "--where", "enviroment=prod")
    assert code == 2 and "did you mean 'environment'" in err
    code, _, err = cli("report", "--table", "stop_condition")
    assert code == 2 and "did you mean 'stop_conditions'" in err
    # Far from anything known: no guess, just the list.
    code, _, err = cli("catalog", "show", "zzzzzz")
    assert code == 4 and "did you mean" not in err and "known:" in err
