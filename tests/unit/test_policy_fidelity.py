"""The refusal list: one test per entry showing regopy and OPA answer differently, and the
embedded engine refusing a bundle that uses it (file:line:col), while OPA's serves it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from opa_bindings import OpaEngine as GoOpa
from opa_bindings import OpaError, OpaUndefinedError

from opsgate.policies.embedded import EmbeddedEngine, OpaEmbeddedEngine
from opsgate.policies.engine import DECISION_RULE, UNAVAILABLE
from opsgate.policies.fidelity import (
    REFUSED_BUILTINS,
    readable_rego_error,
    scan,
)
from opsgate.policies.rego_tests import run_rego_tests
from opsgate.policies.sandbox import Payload, SandboxError, WorkerPool

ROOT = Path(__file__).resolve().parents[2]

# For each refused built-in, a call on which regopy and OPA answer differently.
EVIDENCE: dict[str, str] = {
    "semver.compare": 'semver.compare("1.10.0", "1.9.0")',
    "regex.match": r'regex.match(`\Aprod\z`, "prod")',
    "regex.is_valid": "regex.is_valid(`(?P<x>a)`)",
    "regex.find_n": r'regex.find_n(`\Aa`, "ab", -1)',
    "regex.replace": r'regex.replace("ab", `\Aa`, "x")',
    "regex.find_all_string_submatch_n": r'regex.find_all_string_submatch_n(`\pL`, "ü", -1)',
    "strings.replace_n": 'strings.replace_n({"a": "b", "b": "c"}, "ab")',
    "lower": 'lower("ΑΣ")',
    "upper": 'upper("ǆ")',
    "format_int": "format_int(-3.7, 10)",
    "to_number": 'to_number("1_000")',
    "ceil": "ceil(-0.5)",
    "floor": "floor(-0.5)",
    "indexof": 'indexof("aüb", "")',
    "time.format": "time.format(1767225600000000000)",
    "time.diff": "time.diff(1767225600000000000, 1704067200000000000)",
    "time.parse_ns": 'time.parse_ns("2006-01-02", "2026-3-04")',
    "base64.decode": 'base64.decode("YQ")',
    "urlquery.encode": 'urlquery.encode("a b&c")',
    "urlquery.encode_object": 'urlquery.encode_object({"b": "x y"})',
    "urlquery.decode": 'urlquery.decode("a+b%20c")',
    "object.union": 'object.union({"a": {"b": 1}}, {"a": {"c": 2}})',
    "object.union_n": 'object.union_n([{"a": {"b": 1}}, {"a": {"c": 2}}])',
    "trim_space": 'trim_space("\\u00a0a")',
    "uuid.parse": 'uuid.parse("00000000-0000-0000-0000-000000000000")',
    "max": "max([2, 10])",
    "min": "min([2, 10])",
    "sort": "sort([10, 2])",
}


@pytest.fixture(scope="module")
def pool() -> Any:
    pool = WorkerPool(size=1, timeout=5.0)
    yield pool
    pool.close()


def module(expression: str) -> str:
    return f"package p\nimport rego.v1\nr := {expression}\n"


def regopy_answer(pool: WorkerPool, expression: str) -> dict[str, Any]:
    payload = Payload(expression, (("p.rego", module(expression)),), {}, ("p/r",))
    try:
        return pool.evaluate(payload, "p/r", {})
    except SandboxError as exc:
        return {"ok": False, "error": str(exc)}


def opa_answer(expression: str) -> dict[str, Any]:
    with GoOpa() as engine:
        try:
            engine.add_policy("p.rego", module(expression))
            return {"ok": True, "value": engine.eval_document("p.r", {})}
        except OpaUndefinedError:
            return {"ok": True, "undefined": True}
        except OpaError as exc:
            return {"ok": False, "error": exc.message}


def test_every_entry_has_evidence() -> None:
    assert set(EVIDENCE) == set(REFUSED_BUILTINS)


@pytest.mark.parametrize("builtin", sorted(REFUSED_BUILTINS))
def test_the_entry_answers_unlike_opa(pool: WorkerPool, builtin: str) -> None:
    expression = EVIDENCE[builtin]
    assert expression.startswith(builtin + "(")
    ours, theirs = regopy_answer(pool, expression), opa_answer(expression)
    # Listed only for a wrong value: regopy answers (ok) and not what OPA answers.
    assert ours["ok"] is True, ours
    assert ours != theirs, (ours, theirs)


@pytest.mark.parametrize("builtin", sorted(REFUSED_BUILTINS))
def test_the_entry_makes_the_embedded_engine_refuse_the_bundle(
    tmp_path: Path, builtin: str
) -> None:
    source = (
        "package opsgate\nimport rego.v1\n\n"
        f"probe := {EVIDENCE[builtin]}\n"
        'decision := {"allow": true, "deny": [], "required_approvals": 1}\n'
    )
    (tmp_path / "opsgate.rego").write_text(source)
    with EmbeddedEngine(tmp_path, timeout=5.0) as engine:
        result = engine.evaluate(DECISION_RULE, {})
    assert not result.allow and result.deny_codes == [UNAVAILABLE]
    assert f"opsgate.rego:4:10: {builtin} " in (result.error or ""), result.error
    with OpaEmbeddedEngine(tmp_path, timeout=5.0) as opa:
        assert opa.evaluate(DECISION_RULE, {}).allow


def test_the_shipped_bundle_is_not_refused() -> None:
    sources = [(p.name, p.read_text()) for p in (ROOT / "policies").glob("*.rego")]
    assert scan(sources) == []


SPRINTF_CASES = [
    ('sprintf("%v and %s, %d%%", [1, "a", 2])', False),
    ('sprintf("%q", ["x"])', True),
    ('sprintf("%5s|", ["a"])', True),
    ('sprintf("%x", [255])', True),
    ("sprintf(input.fmt, [1])", True),  # a format from data or input cannot be checked
]


@pytest.mark.parametrize(("call", "refused"), SPRINTF_CASES)
def test_sprintf_is_refused_unless_its_format_is_plain(call: str, refused: bool) -> None:
    found = scan([("a.rego", f"package p\nx := {call}\n")])
    assert bool(found) == refused, found
    if refused:
        assert found[0].builtin == "sprintf"


def test_sprintf_verbs_refused_do_answer_unlike_opa(pool: WorkerPool) -> None:
    expression = 'sprintf("%q", ["x"])'
    assert regopy_answer(pool, expression) != opa_answer(expression)


def test_the_scan_ignores_comments_strings_paths_and_user_functions() -> None:
    source = "\n".join(
        [
            "package p",
            "import rego.v1",
            "# semver.compare(a, b) in a comment",
            'a := "max(1, 2) in a string"',
            "b := `sort([1]) in a raw string`",
            "c := data.lib.lower(input.x)",  # a path into data, not the built-in
            "d := input.max",
            "my_max(xs) := 1",
            "e := my_max([1])",
        ]
    )
    assert scan([("p.rego", source)]) == []


def test_the_scan_names_each_call_with_file_line_and_column() -> None:
    first = 'package p\nimport rego.v1\nx := semver.compare(input.v, "1.0.0")\n'
    second = "package q\ny := 1\n\nz := [lower(n) | some n in input.names]\nw := max([1])\n"
    found = scan([("a.rego", first), ("lib/b.rego", second)])
    assert [(f.file, f.line, f.column, f.builtin) for f in found] == [
        ("a.rego", 3, 6, "semver.compare"),
        ("lib/b.rego", 4, 7, "lower"),
        ("lib/b.rego", 5, 6, "max"),
    ]
    assert str(found[0]).startswith("a.rego:3:6: semver.compare ")


def test_a_bundle_opa_would_not_compile_is_refused(tmp_path: Path) -> None:
    # regopy accepts an unsafe variable; OPA's compiler does not.
    (tmp_path / "opsgate.rego").write_text(
        'package opsgate\nimport rego.v1\nx := y\ndecision := {"allow": true, "deny": []}\n'
    )
    with EmbeddedEngine(tmp_path, timeout=5.0) as engine:
        result = engine.evaluate(DECISION_RULE, {})
    assert result.deny_codes == [UNAVAILABLE]
    assert "opsgate.rego:3: rego_unsafe_var_error: var y is unsafe" in (result.error or "")


def test_a_syntax_error_is_one_line_with_file_line_column(tmp_path: Path) -> None:
    source = 'package opsgate\nimport rego.v1\n\ndecision := {"allow": true\n'
    (tmp_path / "opsgate.rego").write_text(source)
    with EmbeddedEngine(tmp_path, timeout=5.0) as engine:
        error = engine.evaluate(DECISION_RULE, {}).error or ""
    assert "opsgate.rego:4:13: " in error and "\n" not in error and "errorseq" not in error


def test_readable_rego_error_counts_bytes_not_characters() -> None:
    source = 'package p\n# ünïcödé\nx := {"a": 1\n'
    offset = len(source.encode()) - len('{"a": 1\n')
    text = (
        f"(rego-errorseq\n  (error 5:a.rego|{offset}|1\n"
        f"    (errormsg 16:this is unclosed)\n    (errorast |{offset}|1)))"
    )
    assert readable_rego_error(text, {"a.rego": source}) == "a.rego:3:6: this is unclosed"


def test_policy_test_reports_refusals_and_prints_nothing_from_rego(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "opsgate.rego").write_text(
        "package opsgate\nimport rego.v1\n"
        'ok := semver.compare("1.10.0", "1.9.0") == 1\n'
        'decision := {"allow": true, "deny": [], "required_approvals": 1}\n'
    )
    (tmp_path / "opsgate_test.rego").write_text(
        "package opsgate_test\nimport rego.v1\n"
        'test_prints if {\n  print("from rego print")\n  true\n}\n'
    )
    results = run_rego_tests(tmp_path)
    out, _ = capfd.readouterr()
    assert "from rego print" not in out
    bundle = [r for r in results if r.name == "(bundle)"]
    assert len(bundle) == 1 and "opsgate.rego:3:7: semver.compare" in (bundle[0].error or "")
    assert [r.passed for r in results if r.name == "test_prints"] == [True]


ABORTS = """package opsgate

import rego.v1

deny contains {"code": "too_many", "message": "too many replicas"} if {
	object.get(input.action.params, "replicas", 0) > 50
}

decision := {"allow": count(deny) == 0, "deny": [d | some d in deny]}
"""


def test_policy_test_survives_a_regopy_abort(tmp_path: Path) -> None:
    # rego-cpp aborts the process on this `with` (an internal assertion); the child does.
    (tmp_path / "opsgate.rego").write_text(ABORTS)
    (tmp_path / "opsgate_test.rego").write_text(
        "package opsgate_test\nimport rego.v1\n"
        "test_small if data.opsgate.decision.allow"
        ' with input as {"action": {"params": {"replicas": 3}}}\n'
    )
    results = run_rego_tests(tmp_path)
    assert len(results) == 1 and results[0].name == "(bundle)" and not results[0].passed
    assert "regopy crashed running the tests (signal 6)" in (results[0].error or ""), results


def test_policy_test_json_shape_is_unchanged_without_against_opa(tmp_path: Path) -> None:
    (tmp_path / "opsgate.rego").write_text(
        'package opsgate\nimport rego.v1\ndecision := {"allow": true, "deny": []}\n'
    )
    (tmp_path / "opsgate_test.rego").write_text(
        "package opsgate_test\nimport rego.v1\ntest_a if true\n"
    )
    rows = [r.__dict__ for r in run_rego_tests(tmp_path)]
    assert json.loads(json.dumps(rows)) == [
        {"package": "opsgate_test", "name": "test_a", "file": "opsgate_test.rego",
         "passed": True, "error": None}
    ]  # fmt: skip
