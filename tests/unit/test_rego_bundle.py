"""The default policy bundle's Rego unit tests, and the runner that executes them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from opsgate.policies.rego_tests import (
    RegoTestResult,
    discover_tests,
    new_interpreter,
    run_rego_tests,
)

POLICIES = Path(__file__).resolve().parents[2] / "policies"

DENY_CODES = [
    "not_allowlisted",
    "param_out_of_bounds",
    "missing_precondition",
    "insufficient_permissions",
    "verification_undefined",
    "change_freeze",
    "concurrent_action",
]
APPROVAL_DENY_CODES = ["insufficient_permissions", "self_approval"]


@pytest.fixture(scope="module")
def default_results() -> list[RegoTestResult]:
    return run_rego_tests(POLICIES)


def _test_sources() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in POLICIES.rglob("*_test.rego"))


def _policy_sources() -> str:
    return "\n".join(
        p.read_text(encoding="utf-8")
        for p in POLICIES.rglob("*.rego")
        if not p.name.endswith("_test.rego")
    )


def test_default_bundle_passes_every_rego_test(default_results: list[RegoTestResult]) -> None:
    assert len(default_results) >= 50
    failures = [f"{r.rule}: {r.status} {r.error or ''}" for r in default_results if not r.passed]
    assert failures == []


def test_default_bundle_has_tests_for_every_deny_code(
    default_results: list[RegoTestResult],
) -> None:
    names = [r.name for r in default_results]
    for code in DENY_CODES:
        matching = [n for n in names if code in n]
        assert matching, f"no test_* rule named after deny code {code}"
        # Each code is checked both ways: a test that triggers it and one that does not.
        assert re.search(rf'denied_with\([^\n]*"{code}"\)|messages\(d, "{code}"\)', _test_sources())
        assert re.search(rf'not denied_with\([^\n]*"{code}"\)', _test_sources())
    approval_names = [n for n in names if n.startswith("test_approval_")]
    for code in APPROVAL_DENY_CODES:
        assert code in _test_sources()
    assert any("self_approval" in n for n in approval_names)
    assert any("agent" in n for n in approval_names)
    assert any("missing_role" in n for n in approval_names)


def test_every_builtin_the_policy_uses_has_a_builtin_test() -> None:
    # Without comments and string literals, the `name(` left are calls.
    policy = re.sub(r'"(?:[^"\\\n]|\\.)*"|`[^`]*`|#[^\n]*', '""', _policy_sources())
    tests = _test_sources()
    defined = set(re.findall(r"^([a-z_][a-z0-9_]*)\(", policy + "\n" + tests, re.MULTILINE))
    called = set(re.findall(r"\b([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)\(", policy))
    keywords = {"if", "contains", "in", "not", "some", "every", "else", "default"}
    builtins = {c for c in called if c not in defined and c not in keywords}
    assert "time.parse_rfc3339_ns" in builtins
    # The text of every test_builtin_* rule (a rule ends where the next top-level line starts).
    blocks = re.split(r"\n(?=\S)", tests)
    builtin_tests = "\n".join(b for b in blocks if b.startswith("test_builtin_"))
    untested = sorted(b for b in builtins if f"{b}(" not in builtin_tests)
    assert untested == [], f"builtins without a test_builtin_* rule: {untested}"


def test_discovery_finds_each_test_rule_once(tmp_path: Path) -> None:
    (tmp_path / "x_test.rego").write_text(
        "package x_test\n\nimport rego.v1\n\n"
        "test_one if true\n\n"
        "test_one if 1 == 1\n\n"
        "# test_in_a_comment if true\n"
        "todo_test_skipped if false\n"
    )
    tests = discover_tests(tmp_path)
    assert [(t.package, t.name, t.file) for t in tests] == [("x_test", "test_one", "x_test.rego")]


def _write_bundle(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_failing_rego_test_is_reported_as_failed(tmp_path: Path) -> None:
    bundle = _write_bundle(
        tmp_path,
        {
            "p.rego": "package p\n\nimport rego.v1\n\nanswer := 42\n",
            "p_test.rego": (
                "package p_test\n\nimport rego.v1\n\n"
                "test_passes if data.p.answer == 42\n\n"
                "test_fails if data.p.answer == 41\n\n"
                "test_false := false\n\n"
                "test_not_exactly_true := 1\n\n"
                'test_builtin_error if time.parse_rfc3339_ns("2026-01-01T00:00:00Z") > 0\n'
            ),
        },
    )
    results = {r.name: r for r in run_rego_tests(bundle)}
    assert set(results) == {
        "test_passes",
        "test_fails",
        "test_false",
        "test_not_exactly_true",
        "test_builtin_error",
    }
    assert results["test_passes"].passed
    assert results["test_passes"].status == "pass"
    assert results["test_passes"].file == "p_test.rego"
    assert results["test_passes"].package == "p_test"
    for name in ("test_fails", "test_false"):
        assert not results[name].passed
        assert results[name].status == "fail"
    assert not results["test_not_exactly_true"].passed
    assert results["test_not_exactly_true"].error == "evaluated to 1, not true"
    # Strict built-in errors: a builtin that errors fails the test; it is not "undefined".
    errored = results["test_builtin_error"]
    assert not errored.passed
    assert errored.status == "error"
    assert errored.error is not None
    assert errored.error.startswith("evaluation error")


def test_bundle_data_is_merged_by_directory(tmp_path: Path) -> None:
    bundle = _write_bundle(
        tmp_path,
        {
            "data.json": json.dumps({"x": 1, "roles": {"alice": ["sre"]}}),
            "a/b/data.json": json.dumps({"y": 2}),
            "t_test.rego": (
                "package t_test\n\nimport rego.v1\n\n"
                "test_root if data.x == 1\n\n"
                'test_root_roles if data.roles.alice == ["sre"]\n\n'
                "test_nested if data.a.b.y == 2\n"
            ),
        },
    )
    results = run_rego_tests(bundle)
    assert [(r.name, r.passed) for r in results] == [
        ("test_root", True),
        ("test_root_roles", True),
        ("test_nested", True),
    ]


def test_a_compile_error_is_reported_once_on_one_line(tmp_path: Path) -> None:
    bundle = _write_bundle(
        tmp_path,
        {
            "broken.rego": 'package broken\n\nimport rego.v1\n\nx := {"a": 1\n',
            "ok_test.rego": "package ok_test\n\nimport rego.v1\n\ntest_a if true\ntest_b if true\n",
        },
    )
    results = run_rego_tests(bundle)
    assert [r.name for r in results] == ["(bundle)"]
    assert not results[0].passed
    error = results[0].error or ""
    # file:line:col and the message, no rego-cpp error tree with byte offsets.
    assert re.search(r"broken\.rego:5:6: \S", error), error
    assert "\n" not in error and "errorseq" not in error and "|" not in error


def test_bundle_without_tests_that_does_not_load_is_a_failure(tmp_path: Path) -> None:
    _write_bundle(tmp_path, {"data.json": "{not json"})
    results = run_rego_tests(tmp_path)
    assert len(results) == 1
    assert not results[0].passed


# --- the decisions the default bundle gives, read back as JSON (as the engine does) ---


def _case(**overrides: Any) -> dict[str, Any]:
    case: dict[str, Any] = {
        "action": {
            "type": "scale_deployment",
            "target": "checkout",
            "environment": "prod",
            "params": {"deployment": "checkout", "replicas": 5},
            "risk": "medium",
            "reversible": True,
            "spec_hash": "sha256:0000",
            "reason": "p99 latency over SLO",
        },
        "proposer": {"id": "alice", "kind": "human"},
        "incident": {"id": "INC-42", "severity": "sev2", "class": "deploy-related", "tier": None},
        "verification": {"defined": True, "signals": 1, "stop_conditions": 1},
        "preconditions": [
            {"name": "change_freeze", "ok": True, "value": None, "required": False},
            {"name": "concurrent_action", "ok": True, "value": 0, "required": False},
        ],
        "context": {
            "now": "2026-11-23T10:00:00+00:00",
            "now_ns": 1795428000000000000,
            "phase": "propose",
            "active_on_target": 0,
        },
    }
    for key, value in overrides.items():
        case[key] = {**case[key], **value} if isinstance(case[key], dict) else value
    return case


@pytest.fixture(scope="module")
def decide() -> Any:
    interp = new_interpreter(POLICIES)
    bundle = interp.build(None, ["opsgate/decision"])

    def _decide(document: dict[str, Any]) -> dict[str, Any]:
        interp.set_input(document)
        output = interp.query_bundle_entrypoint(bundle, "opsgate/decision")
        assert output.ok()
        decision: dict[str, Any] = json.loads(str(output))["expressions"][0]
        return decision

    return _decide


def _codes(decision: dict[str, Any]) -> list[str]:
    return sorted(d["code"] for d in decision["deny"])


def test_decision_allowed_prod_scale(decide: Any) -> None:
    decision = decide(_case())
    assert decision == {
        "allow": True,
        "deny": [],
        "required_approvals": 1,
        "approver_roles": ["sre-lead", "sre"],
        "ladder": {
            "rung": "off",
            "human_approvals": 1,
            "approvals": 1,
            "reason": "not on the trust ladder",
        },
    }


def test_decision_agent_drain_node_in_prod(decide: Any) -> None:
    decision = decide(
        _case(
            action={
                "type": "drain_node",
                "params": {"node": "n1"},
                "risk": "high",
                "reversible": False,
            },
            proposer={"id": "sre-agent", "kind": "agent", "track_record": {}},
        )
    )
    assert decision["allow"] is False
    assert _codes(decision) == ["insufficient_permissions", "not_allowlisted"]
    # Two for a high-risk type, one more: no verified passes of it (trust ladder).
    assert decision["required_approvals"] == 3


def test_decision_replicas_out_of_bounds(decide: Any) -> None:
    decision = decide(_case(action={"params": {"deployment": "checkout", "replicas": 500}}))
    assert decision["deny"] == [
        {
            "code": "param_out_of_bounds",
            "message": "replicas=500 exceeds the prod bound of 50; propose replicas <= 50",
        }
    ]


def test_decision_without_verification(decide: Any) -> None:
    decision = decide(_case(verification={"defined": False, "signals": 0, "stop_conditions": 0}))
    assert _codes(decision) == ["verification_undefined"]


def test_decision_inside_a_freeze(decide: Any) -> None:
    frozen = [{"name": "change_freeze", "ok": False, "value": "black-friday", "required": False}]
    decision = decide(_case(preconditions=frozen))
    assert _codes(decision) == ["change_freeze"]
    assert "black-friday" in decision["deny"][0]["message"]
