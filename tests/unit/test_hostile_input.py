"""Input that cannot hurt: non-finite numbers, out-of-range durations and settings,
YAML alias bombs and deep nesting are exit 2 with one line naming the field, and leave
the store exactly as it was."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from opsgate.catalog import load_catalog
from opsgate.errors import InvalidInput
from tests.unit.test_cli import ROOT, Cli

PROPOSAL = """
action: scale_deployment
target: checkout
environment: prod
params: {deployment: checkout, replicas: 12}
reason: p99 over SLO
incident: {id: INC-1, severity: sev2, class: capacity-saturation, tier: standard}
"""

VERIFY = """
verification:
  interval: {interval}
  hold: {hold}
  timeout: {timeout}
  signals:
    - {{name: err, query: 'err{{service="checkout"}}', pass: {{max: {pass_max}}}}}
  stop_conditions:
    - {{name: spike, query: 'err{{service="checkout"}}', halt: {{min: {halt_min}}}}}
"""


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    runner = Cli(monkeypatch, capsys, tmp_path / "opsgate.db")
    assert runner("init")[0] == 0
    return runner


def propose_file(cli: Cli, tmp_path: Path, text: str) -> tuple[int, str, str]:
    path = tmp_path / "proposal.yaml"
    path.write_text(text)
    return cli("propose", "-f", str(path))


def verification(**overrides: Any) -> str:
    values = {
        "interval": "1s",
        "hold": "10s",
        "timeout": "60s",
        "pass_max": "0.01",
        "halt_min": "0.2",
    }
    values.update(overrides)
    return VERIFY.format(**values)


def test_a_good_verification_override_is_accepted(cli: Cli, tmp_path: Path) -> None:
    cli.as_user("carol")  # in prod only an sre-lead may propose a weaker verification
    code, _, err = propose_file(cli, tmp_path, PROPOSAL + verification())
    assert code == 0, err


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"pass_max": ".nan"}, "verification.signals.0.pass.max"),
        ({"pass_max": ".inf"}, "verification.signals.0.pass.max"),
        ({"halt_min": "-.inf"}, "verification.stop_conditions.0.halt.min"),
        ({"halt_min": ".nan"}, "verification.stop_conditions.0.halt.min"),
        ({"pass_max": "1e400"}, "verification.signals.0.pass.max"),
        ({"hold": ".nan"}, "verification.hold"),
        ({"hold": ".inf"}, "verification.hold"),
        ({"timeout": ".nan"}, "verification.timeout"),
        ({"timeout": "1e400"}, "verification.timeout"),
        ({"timeout": "99999999999999999999999d"}, "verification.timeout"),
        ({"timeout": "2d", "hold": "1s"}, "verification.timeout"),
        ({"interval": "0"}, "verification"),
        ({"interval": "1ms"}, "verification"),
        ({"interval": ".nan"}, "verification.interval"),
    ],
)
def test_non_finite_or_unbounded_verification_numbers_are_exit_2(
    cli: Cli, tmp_path: Path, override: dict[str, str], field: str
) -> None:
    before = cli.rows()
    code, _, err = propose_file(cli, tmp_path, PROPOSAL + verification(**override))
    assert code == 2, err
    assert err.startswith(f"error: {field}") and len(err.strip().splitlines()) == 1
    assert "unexpected" not in err
    assert cli.rows() == before


def test_a_catalog_entry_with_a_nan_hold_does_not_load(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    text = (ROOT / "catalog" / "restart_service.yaml").read_text()
    (catalog / "restart_service.yaml").write_text(text.replace("hold: 2m", "hold: .nan"))
    with pytest.raises(InvalidInput, match=r"verification\.hold"):
        load_catalog(catalog)


BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
    "i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (BOMB, "aliases (*name) are not allowed"),
        (PROPOSAL + "extra: &x {a: 1}\nmore: *x\n", "aliases (*name) are not allowed"),
        (PROPOSAL + "base: &b {a: 1}\nmerged: {<<: *b}\n", "aliases (*name) are not allowed"),
        ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 64 levels"),
        ("x: " + "{a: " * 100 + "1" + "}" * 100 + "\n", "nested deeper than 64 levels"),
    ],
)
def test_yaml_bombs_and_deep_nesting_are_refused_quickly(
    cli: Cli, tmp_path: Path, text: str, problem: str
) -> None:
    before = cli.rows()
    started = time.monotonic()
    code, _, err = propose_file(cli, tmp_path, text)
    assert time.monotonic() - started < 5
    assert code == 2 and problem in err and len(err.strip().splitlines()) == 1
    assert cli.rows() == before


def test_an_oversized_catalog_file_is_refused(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "huge.yaml").write_text("# " + "x" * 1_100_000 + "\n")
    with pytest.raises(InvalidInput, match="larger than"):
        load_catalog(catalog)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OPSGATE_APPROVAL_TTL", "0.1s"),
        ("OPSGATE_APPROVAL_TTL", "31d"),
        ("OPSGATE_APPROVAL_TTL", "99999999999999999999d"),
        ("OPSGATE_APPROVAL_TTL", "nan"),
        ("OPSGATE_APPROVAL_TTL", "inf"),
        ("OPSGATE_LEASE", "2d"),
    ],
)
def test_duration_settings_have_bounds(cli: Cli, name: str, value: str) -> None:
    cli.monkeypatch.setenv(name, value)
    code, _, err = cli("queue")
    assert code == 2 and name in err and "unexpected" not in err


@pytest.mark.parametrize("since", ["99999999999999999999d", "3651d", "1e400s", "nan"])
def test_since_out_of_range_is_exit_2(cli: Cli, since: str) -> None:
    for command in (["report", "--since", since], ["audit", "decisions", "--since", since]):
        code, _, err = cli(*command)
        assert code == 2, (command, err)
        assert "--since" in err and "unexpected" not in err


@pytest.mark.parametrize("value", ["0s", "0.01s", "6m", "nan"])
def test_the_decision_deadline_has_bounds(cli: Cli, value: str) -> None:
    cli.monkeypatch.setenv("OPSGATE_DECISION_DEADLINE", value)
    code, _, err = cli("queue")
    assert code == 2 and "OPSGATE_DECISION_DEADLINE" in err
