"""Post-change evidence as a user meets it: `catalog lint`, strict catalogs, `show`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from opsgate.cli import main
from opsgate.cli.render import _evidence_row, evidence_note
from opsgate.verification.evaluator import VerificationState

ROOT = Path(__file__).resolve().parents[2]
SHORT = """name: short
run: {argv: ['true']}
verification:
  interval: 10s
  hold: 60s
  timeout: 90s
  signals:
    - {name: e, query: 'rate(x[5m])', pass: {max: 1}}
"""


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("OPSGATE_DB", f"sqlite:///{tmp_path / 'o.db'}")
    monkeypatch.setenv("OPSGATE_POLICIES", str(ROOT / "policies"))
    monkeypatch.delenv("OPSGATE_PROMETHEUS_URL", raising=False)
    monkeypatch.delenv("OPSGATE_PROMETHEUS_SCRAPE_INTERVAL", raising=False)
    monkeypatch.delenv("OPSGATE_CATALOG_STRICT", raising=False)
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    monkeypatch.setenv("OPSGATE_CATALOG", str(catalog))
    return catalog


def test_the_shipped_catalog_lints_clean(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: Path
) -> None:
    monkeypatch.setenv("OPSGATE_CATALOG", str(ROOT / "catalog"))
    assert main(["catalog", "lint", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {
        "scrape_interval": 60.0,
        "scrape_interval_from": "Prometheus's default",
        "findings": [],
    }


def test_lint_names_a_verification_that_cannot_be_met(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: Path
) -> None:
    (env / "short.yaml").write_text(SHORT)
    monkeypatch.setenv("OPSGATE_PROMETHEUS_SCRAPE_INTERVAL", "15s")
    assert main(["catalog", "lint"]) == 1
    out = capsys.readouterr().out
    assert "scrape interval 15s (OPSGATE_PROMETHEUS_SCRAPE_INTERVAL)" in out
    assert "short: verification.timeout:" in out and "at least 375s" in out


def test_a_strict_catalog_refuses_to_load(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: Path
) -> None:
    (env / "short.yaml").write_text(SHORT)
    monkeypatch.setenv("OPSGATE_CATALOG_STRICT", "true")
    assert main(["catalog", "list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "short.yaml: verification.timeout" in err[0]
    monkeypatch.setenv("OPSGATE_CATALOG_STRICT", "maybe")
    assert main(["catalog", "list"]) != 0
    assert "OPSGATE_CATALOG_STRICT" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1s", "soon", "0"])
def test_a_bad_scrape_interval_setting_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: Path, value: str
) -> None:
    monkeypatch.setenv("OPSGATE_PROMETHEUS_SCRAPE_INTERVAL", value)
    assert main(["catalog", "lint"]) != 0
    assert "OPSGATE_PROMETHEUS_SCRAPE_INTERVAL" in capsys.readouterr().err


def test_a_query_pinned_in_time_is_refused_at_load(
    capsys: pytest.CaptureFixture[str], env: Path
) -> None:
    (env / "pinned.yaml").write_text(SHORT.replace("rate(x[5m])", "x @ 1609746000"))
    assert main(["catalog", "list"]) == 2
    assert "never reads post-change data" in capsys.readouterr().err


def test_show_says_how_long_until_evidence_counts() -> None:
    now = datetime.now(UTC)
    state = VerificationState.start(
        now, evidence_from=now + timedelta(seconds=65.2), settled_at=now + timedelta(seconds=90)
    )
    assert evidence_note(state, now) == "waiting for post-change evidence (65s)"
    assert evidence_note(state, now + timedelta(seconds=70)) == "settling: initial delay (20s)"
    assert evidence_note(state, now + timedelta(seconds=95)) is None
    row = _evidence_row(state.model_dump(mode="json"), finished=None)
    assert row is not None and row.startswith("waiting for post-change evidence (6")
    finished = _evidence_row(state.model_dump(mode="json"), finished=now)
    assert finished is not None and finished.startswith("counted from ")
    assert _evidence_row(None, None) is None
    assert _evidence_row({"garbage": 1}, None) is None
