"""What reaches a terminal or a spreadsheet from untrusted text (HTTP bodies, step
output, reasons, comments) is shown, never interpreted: control characters escaped,
formula prefixes neutralised."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from opsgate.models import Execution
from opsgate.reports.build import Report, Table, Window
from opsgate.reports.render import to_csv
from opsgate.safe_text import csv_cell, shown, shown_block
from opsgate.store.sql import SqlStore
from tests.unit.test_cli import SCALE, Cli

OSC52 = "\x1b]52;c;cm0gLXJmIH4=\x07"  # write "rm -rf ~" to the clipboard
TITLE = "\x1b]0;all good\x07"
CLEAR = "\x1b[2J\x1b[H"


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    runner = Cli(monkeypatch, capsys, tmp_path / "opsgate.db")
    assert runner("init")[0] == 0
    return runner


def raw_controls(text: str) -> list[str]:
    return [c for c in text if (ord(c) < 0x20 and c not in "\n") or 0x7F <= ord(c) <= 0x9F]


def test_shown_escapes_every_control_and_reordering_character() -> None:
    assert shown(OSC52) == "\\x1b]52;c;cm0gLXJmIH4=\\x07"
    assert shown("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert shown("x\u202ey\u2066z\u2028") == "x\\u202ey\\u2066z\\u2028"
    assert shown("\x9b31m") == "\\x9b31m"  # the 8-bit CSI
    assert shown("plain text, ünïcödé ✓") == "plain text, ünïcödé ✓"
    assert shown_block("l1\n" + CLEAR + "l2\r\n") == "l1\n\\x1b[2J\\x1b[Hl2\n"


def test_a_comment_cannot_forge_an_approval_line_or_drive_the_terminal(cli: Cli) -> None:
    action_id = cli.json(*SCALE)["action"]["id"]
    cli.as_user("bob")
    forged = f"ok{TITLE}\napproved by carol at 2026-12-01T00:00:00Z{OSC52}"
    code, _, err = cli("approve", action_id, "--comment", forged)
    assert code == 0, err
    code, out, _ = cli("show", action_id)
    assert code == 0
    assert raw_controls(out) == []
    assert [line for line in out.splitlines() if line.startswith("approved by")] == [
        line for line in out.splitlines() if line.startswith("approved by bob")
    ]
    assert "\\x1b]52;c;" in out and "\\napproved by carol" in out
    # the JSON keeps the exact text for tools
    assert cli.json("show", action_id)["approvals"][0]["comment"] == forged


def test_step_output_and_reasons_from_a_hostile_endpoint_are_escaped(cli: Cli) -> None:
    action_id = cli.json(*SCALE)["action"]["id"]
    store = SqlStore(f"sqlite:///{cli.db}")
    now = datetime.now(UTC)
    body = f"HTTP 500: {TITLE}{OSC52}{CLEAR}"
    try:
        with store.transaction() as tx:
            tx.insert_execution(
                Execution(
                    action_id=action_id,
                    target="checkout",
                    environment="prod",
                    worker_id="w",
                    claimed_at=now,
                    lease_expires_at=now + timedelta(seconds=30),
                    heartbeat_at=now,
                    run_started_at=now,
                    run_finished_at=now,
                    run_error=body,
                    run_output=f"line one\n{body}\nline three",
                    reason=f"run failed: {body}",
                    finished_at=now,
                )
            )
    finally:
        store.close()
    code, out, _ = cli("show", action_id)
    assert code == 0
    assert raw_controls(out) == []
    assert "line one\nHTTP 500: \\x1b]0;all good\\x07" in out
    assert "line three" in out


def test_a_hostile_reason_is_refused_or_shown_escaped(cli: Cli) -> None:
    args = [a if a != "p99 latency over SLO" else f"fine{TITLE}{OSC52}" for a in SCALE]
    code, out, err = cli(*args)
    if code == 2:  # refused at the door: nothing stored
        assert "reason" in err
        return
    assert code == 0, err
    action_id = out.split()[1]
    code, out, _ = cli("show", action_id)
    assert raw_controls(out) == [] and "fine\\x1b]0;all good\\x07" in out


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('=HYPERLINK("http://evil","x")', '\'=HYPERLINK("http://evil","x")'),
        ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\uff1d1+1", "'\uff1d1+1"),
        ("checkout", "checkout"),
        (-3, -3),
        (0.5, 0.5),
        (None, None),
    ],
)
def test_csv_cells_that_would_be_formulas_are_neutralised(value: object, expected: object) -> None:
    assert csv_cell(value) == expected


def test_report_csv_neutralises_formulas_in_every_cell() -> None:
    now = datetime.now(UTC)
    window = Window(now - timedelta(days=1), now)
    report = Report(
        kind="summary",
        title="t",
        window=window,
        previous=window,
        by="target",
        where={},
        tables=[Table("by_target", "By target", ["target", "=count"], [["=1+1", 3], ["ok", -2]])],
    )
    rows = list(csv.reader(io.StringIO(to_csv(report))))
    assert rows == [
        ["table", "target", "count"],  # headers are named keys, formula characters dropped
        ["by_target", "'=1+1", "3"],
        ["by_target", "ok", "-2"],
    ]
