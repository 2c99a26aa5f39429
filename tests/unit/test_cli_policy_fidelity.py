"""`opsgate policy test --against-opa` and `doctor` on bundles the embedded engine refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from opsgate.cli import main

ROOT = Path(__file__).resolve().parents[2]

# Decides on max(): rego-cpp orders 150 before 50 (as text), so it allows what OPA denies.
MAX_POLICY = """package opsgate

import rego.v1

deny contains {"code": "too_many", "message": "too many replicas"} if {
\tmax([object.get(input.action.params, "replicas", 0), 50]) != 50
}

decision := {"allow": count(deny) == 0, "deny": [d | some d in deny],
\t"required_approvals": 1, "approver_roles": ["sre"]}

approval := {"allow": true, "deny": []}
"""

# No refused built-in, yet `>` between a string and a number differs: OPA orders every
# string above every number, rego-cpp says false. No list can refuse `>`; the
# differential run finds it.
CROSS_TYPE_POLICY = MAX_POLICY.replace(
    'max([object.get(input.action.params, "replicas", 0), 50]) != 50',
    'object.get(input.action.params, "replicas", 0) > 50',
)

# The same rule with its type checked first: both engines agree.
PLAIN_POLICY = MAX_POLICY.replace(
    'max([object.get(input.action.params, "replicas", 0), 50]) != 50',
    'replicas := object.get(input.action.params, "replicas", 0)\n'
    "\tnot is_number(replicas)\n} {\n"
    '\treplicas := object.get(input.action.params, "replicas", 0)\n'
    "\tis_number(replicas)\n\treplicas > 50",
)

PRINTING_TEST = """package opsgate_test

import rego.v1

test_prints if {
\tprint("rego print output")
\ttrue
}
"""


@pytest.fixture
def run(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> object:
    monkeypatch.setenv("OPSGATE_DB", f"sqlite:///{tmp_path / 'opsgate.db'}")
    monkeypatch.setenv("OPSGATE_CATALOG", str(ROOT / "catalog"))
    monkeypatch.setenv("OPSGATE_POLICIES", str(ROOT / "policies"))
    monkeypatch.setenv("OPSGATE_IDENTITY", "env")
    monkeypatch.setenv("OPSGATE_USER", "alice")

    def call(*args: str) -> tuple[int, str, str]:
        capfd.readouterr()
        code = main(list(args))
        out, err = capfd.readouterr()
        return code, out, err

    return call


def bundle(directory: Path, policy: str, test: str = PRINTING_TEST) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "opsgate.rego").write_text(policy)
    (directory / "opsgate_test.rego").write_text(test)
    shutil.copyfile(ROOT / "policies" / "data.json", directory / "data.json")
    return directory


def test_the_shipped_bundle_agrees_with_opa(run: object) -> None:
    code, out, err = run("policy", "test", "--against-opa", "--count", "200")  # type: ignore[operator]
    assert code == 0, out + err
    assert "against OPA: 200 generated inputs (seed 0), every decision identical" in out


def test_a_refused_bundle_fails_with_the_reason_and_skips_the_comparison(
    run: object, tmp_path: Path
) -> None:
    directory = bundle(tmp_path / "b", MAX_POLICY)
    code, out, err = run("policy", "test", "--policies", str(directory), "--against-opa")  # type: ignore[operator]
    assert code == 3
    assert "FAIL (bundle) (opsgate.rego:6:2: max orders numbers" in out
    assert "against OPA: skipped" in out
    assert err.strip().count("\n") == 0 and "opsgate.rego:6:2" in err


def test_doctor_says_why_the_bundle_is_refused(
    run: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSGATE_POLICIES", str(bundle(tmp_path / "b", MAX_POLICY)))
    code, out, _ = run("doctor", "--json")  # type: ignore[operator]
    assert code == 1
    engine = json.loads(out)["checks"]["policy_engine"]
    assert engine["ok"] is False and "opsgate.rego:6:2: max orders numbers" in engine["detail"]


def test_the_opa_embedded_engine_serves_the_refused_bundle(
    run: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSGATE_POLICIES", str(bundle(tmp_path / "b", MAX_POLICY)))
    monkeypatch.setenv("OPSGATE_POLICY_ENGINE", "opa-embedded")
    _, out, err = run("doctor", "--json")  # type: ignore[operator]
    engine = json.loads(out)["checks"]["policy_engine"]
    assert engine["ok"] is True and engine["engine"] == "opa-embedded", out + err


def test_a_disagreement_fails_and_prints_a_minimal_input(run: object, tmp_path: Path) -> None:
    directory = bundle(tmp_path / "b", CROSS_TYPE_POLICY)
    code, out, err = run(  # type: ignore[operator]
        "policy", "test", "--policies", str(directory), "--against-opa", "--count", "300"
    )
    assert code == 3, out + err
    assert "decided differently; minimal inputs:" in out
    assert 'input:  {"action": {"params": {"replicas": ""}}}' in out
    assert "regopy and OPA disagree on" in err


def test_a_clean_user_bundle_passes(run: object, tmp_path: Path) -> None:
    directory = bundle(tmp_path / "b", PLAIN_POLICY)
    code, out, err = run(  # type: ignore[operator]
        "policy", "test", "--policies", str(directory), "--against-opa", "--count", "300"
    )
    assert code == 0, out + err
    assert "every decision identical" in out


def test_json_output_is_clean_of_rego_print(run: object, tmp_path: Path) -> None:
    directory = bundle(tmp_path / "b", PLAIN_POLICY)
    code, out, err = run(  # type: ignore[operator]
        "policy", "test", "--policies", str(directory), "--against-opa", "--count", "50",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    document = json.loads(out)  # nothing but the JSON document on stdout
    assert document["against_opa"] == {
        "inputs": 50, "seed": 0, "disagreements": 0, "minimal": []
    }  # fmt: skip
    assert [t["name"] for t in document["tests"]] == ["test_prints"]
    assert "rego print output" not in out


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--count", "0"], "--count"),
        (["--count", "-5"], "--count"),
        (["--count", str(10**30)], "--count"),
        (["--count", "many"], "--count"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**64)], "--seed"),
        (["--seed", "1; rm -rf /"], "--seed"),
        (["--policies", "/nonexistent/../../etc/passwd"], "--policies"),
    ],
)
def test_bad_input_is_exit_2_naming_the_field(run: object, args: list[str], field: str) -> None:
    code, out, err = run("policy", "test", "--against-opa", *args)  # type: ignore[operator]
    assert code == 2, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and field in lines[0], err
    assert out == ""


def test_doctor_shows_the_deadline_and_counters_of_the_embedded_engine(
    run: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSGATE_POLICY_TIMEOUT", "250ms")
    _, out, _ = run("doctor", "--json")  # type: ignore[operator]
    engine = json.loads(out)["checks"]["policy_engine"]
    assert engine["ok"] is True and engine["engine"] == "embedded"
    assert engine["timeout"] == 0.25 and engine["timeouts"] == 0
    assert engine["revision"].startswith("sha256:")


@pytest.mark.parametrize("value", ["0", "-1s", "soon", "1e9999s"])
def test_a_bad_policy_timeout_is_exit_2(
    run: object, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("OPSGATE_POLICY_TIMEOUT", value)
    code, out, err = run("policy", "test")  # type: ignore[operator]
    assert code == 2 and "OPSGATE_POLICY_TIMEOUT" in err and out == "", err
