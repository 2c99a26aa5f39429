"""Idempotency keys are scoped to their proposer: a retry returns your own action, and
someone else's use of the same key neither finds your action nor blocks theirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_cli import SCALE, Cli


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    runner = Cli(monkeypatch, capsys, tmp_path / "opsgate.db")
    assert runner("init")[0] == 0
    return runner


def test_the_same_key_from_two_proposers_is_two_actions(cli: Cli) -> None:
    alice = cli.json(*SCALE, "--idempotency-key", "deploy-42")
    again = cli.json(*SCALE, "--idempotency-key", "deploy-42")
    assert again["action"]["id"] == alice["action"]["id"] and again["existing"]

    cli.as_user("carol")
    carol = cli.json(*SCALE, "--idempotency-key", "deploy-42")
    assert carol["action"]["id"] != alice["action"]["id"]
    assert not carol["existing"]
    assert carol["action"]["proposer"]["id"] == "carol"
    # a different spec under carol's key is her conflict, not a view of alice's action
    other = [a if a != "replicas=12" else "replicas=14" for a in SCALE]
    code, _, err = cli(*other, "--idempotency-key", "deploy-42")
    assert code == 5 and carol["action"]["id"] in err and alice["action"]["id"] not in err
    assert cli.rows()["actions"] == 2
