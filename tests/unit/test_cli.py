"""The CLI as a new user meets it: commands, exit codes, one-line errors, --json."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from opsgate.cli import main

ROOT = Path(__file__).resolve().parents[2]
SCALE = [
    "propose", "scale_deployment", "--target", "checkout", "--env", "prod",
    "--param", "deployment=checkout", "--param", "replicas=12",
    "--reason", "p99 latency over SLO", "--incident", "INC-42", "--severity", "sev2",
    "--incident-class", "capacity-saturation", "--tier", "standard",
]  # fmt: skip


class Cli:
    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], db: Path
    ) -> None:
        self.monkeypatch = monkeypatch
        self.capsys = capsys
        self.db = db
        monkeypatch.setenv("OPSGATE_DB", f"sqlite:///{db}")
        monkeypatch.setenv("OPSGATE_CATALOG", str(ROOT / "catalog"))
        monkeypatch.setenv("OPSGATE_POLICIES", str(ROOT / "policies"))
        monkeypatch.setenv("OPSGATE_IDENTITY", "env")
        monkeypatch.delenv("OPSGATE_APPROVAL_TTL", raising=False)
        self.as_user("alice")

    def as_user(self, user: str, kind: str = "human") -> None:
        self.monkeypatch.setenv("OPSGATE_USER", user)
        self.monkeypatch.setenv("OPSGATE_USER_KIND", kind)

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(list(args))
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *args: str) -> Any:
        code, out, err = self(*args, "--json")
        assert code in (0, 3), err
        return json.loads(out)

    def rows(self) -> dict[str, int]:
        with sqlite3.connect(self.db) as conn:
            tables = ["actions", "decisions", "approvals", "audit_events"]
            counts = {t: conn.execute(f"select count(*) from {t}").fetchone()[0] for t in tables}
        conn.close()
        return counts


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    runner = Cli(monkeypatch, capsys, tmp_path / "opsgate.db")
    code, out, err = runner("init")
    assert code == 0, err
    assert "store ready" in out
    return runner


def test_walkthrough(cli: Cli) -> None:
    code, out, _ = cli("catalog", "list")
    assert code == 0 and "scale_deployment" in out and "drain_node" in out
    shown = cli.json("catalog", "show", "scale_deployment")
    assert shown["params"]["replicas"]["type"] == "integer" and shown["reversible"] is True

    proposed = cli.json(*SCALE)
    action_id = proposed["action"]["id"]
    assert proposed["action"]["state"] == "pending_approval"
    assert proposed["decision"]["allow"] is True

    queue = cli.json("queue")
    assert [a["id"] for a in queue] == [action_id]

    code, _, err = cli("approve", action_id)
    assert code == 3 and err.startswith("error: ") and len(err.strip().splitlines()) == 1

    cli.as_user("bob")
    code, out, err = cli("approve", action_id, "--comment", "looks right")
    assert code == 0, err
    assert "approved" in out

    details = cli.json("show", action_id)
    assert details["action"]["state"] == "approved"
    assert [e["kind"] for e in details["events"]] == [
        "action.pending_approval",
        "approval.refused",
        "approval.added",
        "action.approved",
    ]
    assert details["approvals"][0]["comment"] == "looks right"
    code, out, _ = cli("show", action_id)
    assert code == 0 and "approved by bob" in out

    code, out, _ = cli("audit", "verify")
    assert code == 0 and "audit chain ok: 4 events" in out
    code, out, _ = cli("audit", "export", "--format", "jsonl")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [e["seq"] for e in lines] == [1, 2, 3, 4]


def test_blocked_proposal_exits_3_and_is_recorded(cli: Cli) -> None:
    args = [a if a != "replicas=12" else "replicas=500" for a in SCALE]
    code, out, _ = cli(*args)
    assert code == 3
    assert "param_out_of_bounds" in out
    assert cli.rows()["actions"] == 1


def test_policy_eval_is_a_dry_run(cli: Cli) -> None:
    before = cli.rows()
    args = ["policy", "eval", *SCALE[1:]]
    code, out, _ = cli(*args)
    assert code == 0 and out.startswith("allow")
    args = [a if a != "replicas=12" else "replicas=500" for a in args]
    code, out, _ = cli(*args)
    assert code == 3 and "param_out_of_bounds" in out
    assert cli.rows() == before


def test_propose_from_file_and_stdin(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proposal = tmp_path / "proposal.yaml"
    proposal.write_text(
        "action: restart_service\ntarget: cart\nenvironment: staging\n"
        "params: {deployment: cart}\nreason: memory leak\n"
        "incident: {id: INC-7, severity: sev3, class: resource-leak, tier: standard}\n"
    )
    first = cli.json("propose", "-f", str(proposal))
    assert first["action"]["state"] == "pending_approval"
    import io

    document = {
        "action": "restart_service",
        "target": "search",
        "environment": "staging",
        "params": {"deployment": "search"},
        "reason": "stuck workers",
    }
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(json.dumps(document).encode())))
    second = cli.json("propose", "-f", "-")
    assert second["action"]["target"] == "search"


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (b"action: [unclosed", "proposal.yaml"),
        (b"\xff\xfe not utf-8", "proposal.yaml"),
        (
            b"action: scale_deployment\ntarget: checkout\nenvironment: prod\nreason: x\n"
            b"params: {deployment: checkout, replicas: 3}\nbogus: 1\n",
            "bogus",
        ),
        (
            b"action: scale_deployment\ntarget: checkout\nenvironment: prod\nreason: x\n"
            b"params: {deployment: checkout, replicas: -1}\n",
            "params.replicas",
        ),
        (b"- a list\n", "proposal"),
        (b"", "file"),
    ],
)
def test_bad_files_exit_2_with_one_line(
    cli: Cli, tmp_path: Path, content: bytes, field: str
) -> None:
    path = tmp_path / "proposal.yaml"
    path.write_bytes(content)
    before = cli.rows()
    code, _, err = cli("propose", "-f", str(path))
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and field in err
    assert "Traceback" not in err
    assert cli.rows() == before


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["propose", "nope", "--target", "x", "--env", "prod", "--reason", "r"], "action"),
        ([*SCALE, "--param", "colour=blue"], "params.colour"),
        ([*SCALE[:-8], "--param", "replicas"], "--param"),
        ([a if a != "p99 latency over SLO" else "x" * 3000 for a in SCALE], "reason"),
    ],
)
def test_bad_flags_exit_2(cli: Cli, args: list[str], field: str) -> None:
    before = cli.rows()
    code, _, err = cli(*args)
    assert code == 2, err
    assert field in err and len(err.strip().splitlines()) == 1
    assert cli.rows() == before


def test_idempotency_key_on_the_cli(cli: Cli) -> None:
    first = cli.json(*SCALE, "--idempotency-key", "k1")
    again = cli.json(*SCALE, "--idempotency-key", "k1")
    assert again["existing"] and again["action"]["id"] == first["action"]["id"]
    args = [a if a != "replicas=12" else "replicas=13" for a in SCALE]
    code, _, err = cli(*args, "--idempotency-key", "k1")
    assert code == 5 and "different spec" in err


def test_exit_codes_for_missing_and_conflicting(cli: Cli) -> None:
    code, _, err = cli("show", "01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert code == 4 and "no action" in err
    action_id = cli.json(*SCALE)["action"]["id"]
    code, _, _ = cli("cancel", action_id)
    assert code == 0
    code, _, err = cli("cancel", action_id)
    assert code == 5 and "cancelled" in err
    cli.as_user("bob")
    code, _, err = cli("reject", action_id, "--reason", "late")
    assert code == 5


def test_reject_needs_a_reason(cli: Cli) -> None:
    action_id = cli.json(*SCALE)["action"]["id"]
    cli.as_user("carol")
    code, _, err = cli("reject", action_id)
    assert code == 2 and "--reason" in err


def test_audit_verify_names_the_tampered_event(cli: Cli) -> None:
    action_id = cli.json(*SCALE)["action"]["id"]
    cli.as_user("bob")
    assert cli("approve", action_id)[0] == 0
    with sqlite3.connect(cli.db) as conn:
        conn.execute("update audit_events set actor = 'mallory' where seq = 2")
    conn.close()
    code, _, err = cli("audit", "verify")
    assert code == 5 and "seq 2" in err


def test_policy_test_runs_the_default_bundle(cli: Cli) -> None:
    code, out, err = cli("policy", "test")
    assert code == 0, out + err
    assert " 0 failed" in out


def test_no_as_flag(cli: Cli) -> None:
    code, _, err = cli("approve", "01ARZ3NDEKTSV4RRFFQ69G5FAV", "--as", "bob")
    assert code == 2 and "--as" in err


def test_env_identity_requires_user(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPSGATE_USER")
    code, _, err = cli(*SCALE)
    assert code == 2 and "OPSGATE_USER" in err


def test_audit_verify_notices_events_cut_from_the_end(cli: Cli) -> None:
    action_id = cli.json(*SCALE)["action"]["id"]
    cli.as_user("bob")
    assert cli("approve", action_id)[0] == 0
    with sqlite3.connect(cli.db) as conn:
        conn.execute("delete from audit_events where seq = (select max(seq) from audit_events)")
    conn.close()
    code, _, err = cli("audit", "verify")
    assert code == 5 and "removed from the end" in err
