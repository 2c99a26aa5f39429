"""The embedded engine fails closed and recompiles when the bundle changes."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import regopy

from opsgate.policies import embedded
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.policies.engine import DECISION_RULE, UNAVAILABLE, bundle_revision, interpret

ALLOW_ALL = """package opsgate
import rego.v1
deny contains {"code": "too_big", "message": "n is too big"} if input.n > 5
decision := {"allow": count(deny) == 0, "deny": deny, "required_approvals": 1,
             "approver_roles": ["sre"]}
"""

ERRORING_BUILTIN = """package opsgate
import rego.v1
# to_number errors on a non-numeric string: without strict errors this rule would
# simply be undefined and the decision would allow (fail open).
deny contains {"code": "too_big", "message": "n is too big"} if to_number(input.n) > 5
decision := {"allow": count(deny) == 0, "deny": deny, "required_approvals": 1,
             "approver_roles": ["sre"]}
"""


def bundle(tmp_path: Path, source: str, data: str = "{}") -> Path:
    (tmp_path / "opsgate.rego").write_text(source)
    (tmp_path / "data.json").write_text(data)
    return tmp_path


def test_allow_and_deny(tmp_path: Path) -> None:
    engine = EmbeddedEngine(bundle(tmp_path, ALLOW_ALL))
    ok = engine.evaluate(DECISION_RULE, {"n": 1})
    assert ok.allow and ok.deny == () and ok.approver_roles == ("sre",)
    no = engine.evaluate(DECISION_RULE, {"n": 9})
    assert not no.allow and no.deny_codes == ["too_big"]
    assert ok.revision == bundle_revision(tmp_path)


def test_erroring_builtin_in_a_deny_rule_denies(tmp_path: Path) -> None:
    directory = bundle(tmp_path, ERRORING_BUILTIN)
    result = EmbeddedEngine(directory).evaluate(DECISION_RULE, {"n": "not-a-number"})
    assert not result.allow
    assert result.deny_codes == [UNAVAILABLE]
    # The reason strict errors matter: a lax interpreter allows the same input.
    lax = regopy.Interpreter()
    lax.add_module("opsgate.rego", ERRORING_BUILTIN)
    lax.set_input({"n": "not-a-number"})
    output = lax.query("data.opsgate.decision.allow")
    assert output.ok() and '"expressions":[true]' in str(output).replace(" ", "")


def test_time_builtin_with_z_suffix_denies(tmp_path: Path) -> None:
    source = """package opsgate
import rego.v1
deny contains {"code": "frozen", "message": "m"} if time.parse_rfc3339_ns(input.t) > 0
decision := {"allow": count(deny) == 0, "deny": deny, "required_approvals": 1}
"""
    engine = EmbeddedEngine(bundle(tmp_path, source))
    result = engine.evaluate(DECISION_RULE, {"t": "2026-11-23T10:00:00Z"})
    assert not result.allow
    assert set(result.deny_codes) <= {UNAVAILABLE, "frozen"}


@pytest.mark.parametrize(
    "source",
    [
        "package opsgate\nimport rego.v1\nother := 1\n",  # decision undefined
        'package opsgate\nimport rego.v1\ndecision := {"deny": []}\n',  # no allow
        'package opsgate\nimport rego.v1\ndecision := {"allow": "yes", "deny": []}\n',
        'package opsgate\nimport rego.v1\ndecision := {"allow": true, "deny": [1]}\n',
        "package opsgate\nimport rego.v1\ndecision := true\n",
        "package opsgate\nthis is not rego\n",  # does not compile
    ],
)
def test_anything_but_a_clean_allow_is_a_deny(tmp_path: Path, source: str) -> None:
    result = EmbeddedEngine(bundle(tmp_path, source)).evaluate(DECISION_RULE, {"n": 1})
    assert not result.allow
    assert UNAVAILABLE in result.deny_codes


def test_interpret_requires_boolean_true() -> None:
    assert not interpret({"allow": 1, "deny": []}, "r").allow
    assert not interpret({"allow": True, "deny": [], "required_approvals": 0}, "r").allow
    assert interpret({"allow": True, "deny": [], "required_approvals": 2}, "r").allow


def test_missing_bundle_denies(tmp_path: Path) -> None:
    result = EmbeddedEngine(tmp_path / "nope").evaluate(DECISION_RULE, {"n": 1})
    assert not result.allow and result.deny_codes == [UNAVAILABLE]


def test_recompiles_when_files_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "RELOAD_CHECK_SECONDS", 0.0)
    directory = bundle(tmp_path, ALLOW_ALL)
    engine = EmbeddedEngine(directory)
    first = engine.revision()
    assert engine.evaluate(DECISION_RULE, {"n": 3}).allow
    path = directory / "opsgate.rego"
    path.write_text(ALLOW_ALL.replace("input.n > 5", "input.n > 2"))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert engine.evaluate(DECISION_RULE, {"n": 3}).deny_codes == ["too_big"]
    assert engine.revision() != first


def test_threads_share_the_compiled_bundle(tmp_path: Path) -> None:
    # What is tested is that threads get each their own right answer, not the deadline
    # (which has tests of its own): on a loaded 2-core machine a decision can queue past
    # the default 0.5 s and be denied, so this engine's deadline is generous.
    engine = EmbeddedEngine(bundle(tmp_path, ALLOW_ALL), timeout=30.0)
    errors: list[str] = []

    def work(offset: int) -> None:
        for i in range(300):
            n = (i + offset) % 10
            result = engine.evaluate(DECISION_RULE, {"n": n})
            if result.allow != (n <= 5):
                errors.append(f"n={n} allow={result.allow} {result.deny_codes}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
