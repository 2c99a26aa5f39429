"""The shipped bundle decides exactly as OPA: regopy against OPA's Go evaluator.

hypothesis draws inputs over the policy input contract (opsgate.policies.differential)
and shrinks any disagreement to a minimal input, which the failure prints.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsgate.catalog import load_catalog
from opsgate.policies.differential import InProcess, Space, compare, generate, shrink
from opsgate.policies.engine import DECISION_RULE, PolicyResult, load_bundle_data

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"
CATALOG = sorted(load_catalog(ROOT / "catalog").types)

FREEZE = [
    {
        "name": "black-friday",
        "start": "2026-11-20T00:00:00+00:00",
        "end": "2026-11-30T00:00:00Z",
        "environments": ["prod"],
        "exempt_severities": ["sev1"],
    },
    {"name": "everywhere", "start": "2026-11-23T10:00:00.000001+00:00",
     "end": "2026-11-23T10:00:00.000002+00:00", "environments": ["*"]},
    {"name": "broken", "environments": ["staging"]},
]  # fmt: skip


def engines(directory: Path) -> tuple[InProcess, InProcess, Space]:
    space = Space.from_data(load_bundle_data(directory), CATALOG)
    return InProcess("regopy", directory), InProcess("opa", directory), space


@pytest.fixture(scope="module")
def shipped() -> tuple[InProcess, InProcess, Space]:
    return engines(POLICIES)


# The shipped policy under other tunables: freeze windows, a cap above 9 and bounds of
# different lengths (rego-cpp once ordered 2 after 10 in the policy's min()).
VARIANTS: dict[str, dict[str, Any]] = {
    "freeze": {"freeze_windows": FREEZE},
    "tunables": {
        "max_required_approvals": 10,
        "param_bounds": {
            "scale_deployment": {
                "replicas": {"prod": {"min": 9, "max": 100}, "default": {"max": 1000}}
            }
        },
    },
    "cap-below-one": {"max_required_approvals": 0},
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[InProcess, InProcess, Space]:
    directory = tmp_path_factory.mktemp(request.param)
    for path in POLICIES.iterdir():
        if path.is_file():
            shutil.copyfile(path, directory / path.name)
    data = json.loads((directory / "data.json").read_text())
    data.update(VARIANTS[request.param])
    (directory / "data.json").write_text(json.dumps(data))
    return engines(directory)


def check(trio: tuple[InProcess, InProcess, Space], data: st.DataObject) -> None:
    embedded, opa, space = trio
    rule, document = generate(space, lambda options: data.draw(st.sampled_from(options)))
    found = compare(embedded, opa, rule, document)
    if found is not None:
        found = shrink(embedded, opa, found)
        pytest.fail(
            f"regopy and OPA disagree on {found.rule} ({', '.join(found.fields())}) for\n"
            f"{json.dumps(found.input, indent=1, sort_keys=True)}\n"
            f"regopy: {found.embedded}\nOPA:    {found.opa}"
        )


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_the_shipped_bundle_agrees_with_opa(
    shipped: tuple[InProcess, InProcess, Space], data: st.DataObject
) -> None:
    check(shipped, data)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_the_shipped_policy_with_other_data_agrees_with_opa(
    variant: tuple[InProcess, InProcess, Space], data: st.DataObject
) -> None:
    check(variant, data)


def test_the_space_covers_the_contract(shipped: tuple[InProcess, InProcess, Space]) -> None:
    space = shipped[2]
    assert set(CATALOG) <= set(space.action_types)
    assert {"prod", "staging", "dev"} <= set(space.environments)
    assert {"alice", "carol", "dave", "sre-agent"} <= set(space.principals)
    # Each replica bound, and one either side of it.
    assert {0, 1, 2, 49, 50, 51, 99, 100, 101} <= set(space.param_values["replicas"])


class Flipped:
    """OPA's answer with allow flipped: a disagreement the check must catch."""

    def __init__(self, inner: InProcess) -> None:
        self.inner = inner

    def evaluate(self, rule: str, input: Any) -> PolicyResult:
        result = self.inner.evaluate(rule, input)
        if input.get("action", {}).get("environment") == "prod":
            return dataclasses.replace(result, allow=not result.allow)
        return result


def test_a_disagreement_is_found_and_shrunk(shipped: tuple[InProcess, InProcess, Space]) -> None:
    embedded, opa, space = shipped
    rule, document = generate(space, lambda options: options[0])
    document["action"]["environment"] = "prod"
    found = compare(embedded, Flipped(opa), rule, document)
    assert found is not None and "allow" in found.fields()
    small = shrink(embedded, Flipped(opa), found)
    assert small.fields() == found.fields() and small.rule == rule
    assert small.input["action"]["environment"] == "prod"
    assert len(json.dumps(small.input)) < len(json.dumps(document)) / 2, small.input


def test_an_input_missing_its_fields_is_a_known_fail_closed_divergence(
    shipped: tuple[InProcess, InProcess, Space],
) -> None:
    # Found by shrinking: with fields absent the policy formats its own "" defaults, and
    # rego-cpp's sprintf then emits unescaped quotes (output that is not JSON). regopy
    # fails closed (policy_engine_unavailable) where OPA denies with codes. opsgate
    # always sends every field (build_input), so the generator keeps them all; this test
    # records the divergence and that it stays on the closed side.
    embedded, opa, _ = shipped
    regopy_answer, opa_answer = (
        embedded.evaluate(DECISION_RULE, {}),
        opa.evaluate(DECISION_RULE, {}),
    )
    assert not regopy_answer.allow and regopy_answer.deny_codes == ["policy_engine_unavailable"]
    assert not opa_answer.allow and "not_allowlisted" in opa_answer.deny_codes
