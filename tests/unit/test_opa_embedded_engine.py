"""OPSGATE_POLICY_ENGINE=opa-embedded: OPA's Go evaluator, in the same deadline-bound workers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from opsgate.config import Settings
from opsgate.errors import ConfigError
from opsgate.policies.embedded import EmbeddedEngine, OpaEmbeddedEngine
from opsgate.policies.engine import APPROVAL_RULE, DECISION_RULE, UNAVAILABLE
from opsgate.policies.opa import PROBE_INPUT

ROOT = Path(__file__).resolve().parents[2]

# 9 million iterations and almost no memory: seconds in OPA, far past the budget.
SLOW = """package opsgate
import rego.v1
deny contains {"code": "slow", "message": "m"} if {
    input.slow == true
    count([1 | some x in numbers.range(1, 3000); some y in numbers.range(1, 3000)]) > 0
}
decision := {"allow": count(deny) == 0, "deny": [d | some d in deny], "required_approvals": 1,
             "approver_roles": ["sre"]}
"""


def test_the_shipped_bundle_decides_as_the_embedded_engine() -> None:
    documents = [
        PROBE_INPUT,
        {**PROBE_INPUT, "action": {**PROBE_INPUT["action"], "environment": "prod",
                                   "type": "scale_deployment",
                                   "params": {"deployment": "x", "replicas": 60}}},
        {**PROBE_INPUT, "approver": {"id": "opsgate-probe", "kind": "human"}},
    ]  # fmt: skip
    with (
        EmbeddedEngine(ROOT / "policies", timeout=5.0) as regopy,
        OpaEmbeddedEngine(ROOT / "policies", timeout=5.0) as opa,
    ):
        assert opa.name == "opa-embedded" and opa.revision() == regopy.revision()
        for document in documents:
            # The approval rule only with an approver (a missing field hits rego-cpp's
            # sprintf quoting bug: see test_policy_differential).
            for rule in (DECISION_RULE, APPROVAL_RULE)[: 1 + ("approver" in document)]:
                ours, theirs = regopy.evaluate(rule, document), opa.evaluate(rule, document)
                assert theirs.error is None, theirs
                assert (ours.allow, ours.deny, ours.required_approvals, ours.approver_roles) == (
                    theirs.allow, theirs.deny, theirs.required_approvals, theirs.approver_roles
                )  # fmt: skip


def test_a_slow_evaluation_is_cut_at_the_deadline(tmp_path: Path) -> None:
    (tmp_path / "opsgate.rego").write_text(SLOW)
    with OpaEmbeddedEngine(tmp_path, timeout=0.3) as engine:
        assert engine.evaluate(DECISION_RULE, {"slow": False}).allow
        start = time.monotonic()
        result = engine.evaluate(DECISION_RULE, {"slow": True})
        assert time.monotonic() - start < 1.3
        assert result.deny_codes == [UNAVAILABLE] and "deadline" in (result.error or "")
        assert engine.timeouts == 1
        assert engine.evaluate(DECISION_RULE, {"slow": False}).allow


def test_threads_share_the_engine(tmp_path: Path) -> None:
    (tmp_path / "opsgate.rego").write_text(SLOW.replace("input.slow == true", "input.n > 5"))
    errors: list[str] = []
    with OpaEmbeddedEngine(tmp_path, timeout=5.0, workers=2) as engine:

        def work(offset: int) -> None:
            for i in range(100):
                n = (i + offset) % 10
                if n > 5:
                    continue  # the slow branch: not what this test is about
                if not engine.evaluate(DECISION_RULE, {"n": n}).allow:
                    errors.append(f"n={n}")

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert engine.evaluations == 4 * 60
    assert errors == []


def test_the_setting_accepts_the_engine_and_nothing_else() -> None:
    settings = Settings.load(env={"OPSGATE_POLICY_ENGINE": "opa-embedded"}, toml_path=Path("/nx"))
    assert settings.policy_engine == "opa-embedded"
    with pytest.raises(ConfigError, match="OPSGATE_POLICY_ENGINE"):
        Settings.load(env={"OPSGATE_POLICY_ENGINE": "opa-embedded; rm"}, toml_path=Path("/nx"))


def test_without_the_package_every_decision_denies_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "opa_bindings", None)  # makes the import fail
    with OpaEmbeddedEngine(ROOT / "policies", timeout=5.0) as engine:
        result = engine.evaluate(DECISION_RULE, PROBE_INPUT)
    assert result.deny_codes == [UNAVAILABLE]
    assert "opa-golib-python-bindings" in (result.error or "")
