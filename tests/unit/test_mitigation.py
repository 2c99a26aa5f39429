"""Verification that fits mitigations: ranges relative to a baseline, settling, intent,
typed captures, and the plan (with what weakens it) as approver and policy see it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from opsgate.catalog import load_catalog
from opsgate.executor.plan import action_plan, plan_lines
from opsgate.executor.runners import typed_capture
from opsgate.models import (
    Action,
    ActionState,
    ActionType,
    Identity,
    Incident,
    Range,
    Signal,
    StopCondition,
    VerificationSpec,
)
from opsgate.policies.input import verification_input
from opsgate.verification.evaluator import VerificationState, in_range, step
from opsgate.verification.hub import rollback_check
from opsgate.verification.lint import lint_intent
from opsgate.verification.plan import verification_differences
from opsgate.verification.provider import QueryResult

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- ranges ---------------------------------------------------------------------------


def test_relative_bounds_validate() -> None:
    assert Range(baseline_plus=0.05).relative and not Range(baseline_plus=0.05).absolute
    with pytest.raises(ValidationError, match="not both"):
        Range(baseline_plus=0.05, baseline_times=2)
    with pytest.raises(ValidationError):
        Range(baseline_times=0)
    with pytest.raises(ValidationError):
        Range(baseline_times=-1)
    with pytest.raises(ValidationError, match="finite"):
        Range(baseline_plus=float("nan"))
    with pytest.raises(ValidationError, match="needs"):
        Range()


@pytest.mark.parametrize(
    ("r", "value", "baseline", "side", "inside"),
    [
        (Range(baseline_plus=0.05), 0.55, 0.5, "min", True),  # halt: 5 points worse
        (Range(baseline_plus=0.05), 0.54, 0.5, "min", False),
        (Range(baseline_times=1.5), 0.31, 0.2, "min", True),
        (Range(baseline_times=1.5), 0.29, 0.2, "min", False),
        (Range(baseline_times=0.5), 0.25, 0.5, "max", True),  # pass: half the baseline
        (Range(baseline_times=0.5), 0.26, 0.5, "max", False),
        (Range(max=0.01, baseline_times=0.5), 0.009, 0.5, "max", True),  # or the absolute
        (Range(max=0.01, baseline_times=0.5), 0.3, 0.5, "max", False),
        (Range(min=0.9, baseline_plus=0.05), 0.95, 0.99, "min", True),  # absolute fires
        (Range(baseline_plus=-10), 90, 100, "max", True),  # worse when lower: 10 below
    ],
)
def test_in_range(r: Range, value: float, baseline: float, side: Any, inside: bool) -> None:
    assert in_range(r, value, baseline, side) is inside


Q = "rate(errors[1m])"
STOP_Q = "rate(errors[1m]) * 1"
RENDERED = {"error_rate": Q, "error_spike": STOP_Q}


def spec(pass_: dict[str, float], halt: dict[str, float], **kw: Any) -> VerificationSpec:
    return VerificationSpec.model_validate(
        {
            "interval": 10,
            "hold": 20,
            "timeout": 300,
            "signals": [{"name": "error_rate", "query": Q, "pass": pass_}],
            "stop_conditions": [{"name": "error_spike", "query": STOP_Q, "halt": halt}],
            "failure_limit": 0,
            "error_limit": 1,
            **kw,
        }
    )


def tick(
    s: VerificationSpec, state: VerificationState, t: float, value: float | None
) -> VerificationState:
    results = {Q: QueryResult.of(value, at(t)), STOP_Q: QueryResult.of(value, at(t))}
    new, _ = step(s, state, at(t), results, RENDERED)
    return new


def test_a_mitigation_at_fifty_percent_passes_at_half_its_baseline() -> None:
    s = spec({"max": 0.01, "baseline_times": 0.5}, {"baseline_plus": 0.05})
    state = VerificationState.start(at(0), baseline={"error_rate": 0.5, "error_spike": 0.5})
    # 0.5 is where it started: neither a halt (not worse) nor a pass (not better)
    state = tick(s, VerificationState.start(at(0), baseline=state.baseline), 10, 0.2)
    assert state.outcome is None and state.passing_since == at(10)
    state = tick(s, state, 20, 0.2)
    state = tick(s, state, 30, 0.1)
    assert state.outcome == "succeeded"


def test_the_same_fix_fails_under_absolute_ranges_of_today() -> None:
    s = spec({"max": 0.01}, {"min": 0.3})
    state = VerificationState.start(at(0))
    state = tick(s, state, 10, 0.5)
    assert state.outcome == "stopped"  # halts at once: the incident itself trips it


def test_a_change_worse_than_its_baseline_halts_below_an_absolute_threshold() -> None:
    s = spec({"max": 0.2}, {"baseline_plus": 0.05})
    state = VerificationState.start(at(0), baseline={"error_rate": 0.01, "error_spike": 0.01})
    state = tick(s, state, 10, 0.07)  # under any absolute 0.2, but 6 points worse
    assert state.outcome == "stopped" and state.decided_by == "error_spike"
    assert "baseline + 0.05 (0.06)" in state.detail


def test_a_relative_range_without_a_baseline_is_an_error_never_a_pass() -> None:
    s = spec({"baseline_times": 0.5}, {"baseline_plus": 0.05})
    state = VerificationState.start(at(0))
    results = {Q: QueryResult.of(0.0, at(10)), STOP_Q: QueryResult.of(0.0, at(10))}
    state, records = step(s, state, at(10), results, RENDERED)
    assert {r.outcome for r in records} == {"error"} and state.passing_since is None
    state, _ = step(s, state, at(20), results, RENDERED)
    assert state.outcome == "provider_errors"


def test_stop_conditions_win_over_settling_signals() -> None:
    """Settling signals do not count; a stop condition in the same interval still halts."""
    s = spec({"baseline_times": 0.5}, {"baseline_plus": 0.05}, initial_delay=60)
    state = VerificationState.start(
        at(0), settled_at=at(60), baseline={"error_rate": 0.5, "error_spike": 0.5}
    )
    state = tick(s, state, 10, 0.52)
    assert state.outcome is None  # settling: the failing signal does not count
    state = tick(s, state, 20, 0.6)
    assert state.outcome == "stopped"


def test_rollback_of_a_mitigation_is_verified_back_at_its_baseline() -> None:
    s = spec({"max": 0.01, "baseline_times": 0.5}, {"baseline_plus": 0.05})
    back = rollback_check(s)
    assert back.stop_conditions == ()
    (signal,) = back.signals
    assert signal.pass_ == Range(max=0.01, baseline_times=1.1)
    state = VerificationState.start(at(0), baseline={"error_rate": 0.5})
    assert tick(back, state, 10, 0.52).passing_since == at(10)  # back where it was
    assert tick(back, state, 10, 0.6).passing_since is None  # worse than before


# --- typed captures -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("false", "boolean", False),
        ("True\n", "boolean", True),
        ("3", "integer", 3),
        ("-12", "integer", -12),
        ("0.25", "number", 0.25),
        ('{"a": [1, true]}', "json", {"a": [1, True]}),
        ("false", "json", False),
        ("x y", None, "x y"),
        (" x ", "string", "x"),
    ],
)
def test_typed_capture(text: str, kind: str | None, value: Any) -> None:
    assert typed_capture(text, kind) == value


@pytest.mark.parametrize(
    ("text", "kind"),
    [("no", "boolean"), ("3.5", "integer"), ("nan", "number"), ("inf", "number"), ("{", "json")],
)
def test_a_capture_that_is_not_its_type_is_refused(text: str, kind: str) -> None:
    with pytest.raises(ValueError, match="captured value"):
        typed_capture(text, kind)


# --- intent and its lint -------------------------------------------------------------


def _type(intent: str, halt: dict[str, float], worse: str = "higher") -> ActionType:
    return ActionType.model_validate(
        {
            "name": "t",
            "intent": intent,
            "run": {"argv": ["true"]},
            "verification": spec({"max": 0.01}, halt).model_dump(by_alias=True)
            | {
                "stop_conditions": [
                    {"name": "s", "query": STOP_Q, "halt": halt, "worse_when": worse}
                ]
            },
        }
    )


def test_lint_an_absolute_halt_on_a_mitigation() -> None:
    (finding,) = lint_intent(_type("mitigation", {"min": 0.3}))
    assert "trips at once during an incident" in finding.message
    assert lint_intent(_type("mitigation", {"baseline_plus": 0.05})) == []
    assert lint_intent(_type("change", {"min": 0.3})) == []
    assert lint_intent(_type("mitigation", {"max": 0})) == []  # the better side: no traffic


def test_lint_a_times_halt_that_fires_on_a_zero_baseline() -> None:
    (finding,) = lint_intent(_type("change", {"baseline_times": 1.5}))
    assert "baseline" in finding.message and "0" in finding.message


def test_the_shipped_fixes_are_mitigations_that_stop_on_worse_than_before() -> None:
    catalog = load_catalog(ROOT / "catalog")
    assert catalog.warnings == ()
    for name in ("rollback_deploy", "restart_service", "scale_deployment"):
        action_type = catalog.get(name)
        assert action_type.intent == "mitigation"
        spike = next(c for c in action_type.verification.stop_conditions if c.name == "error_spike")
        assert spike.halt.relative and not spike.halt.absolute
    flag = catalog.get("toggle_feature_flag")
    assert flag.capture is not None and flag.capture.type == "boolean"


# --- the plan and what weakens it ------------------------------------------------------


def test_differences_name_what_weakens() -> None:
    default = spec({"max": 0.01}, {"min": 0.3}, hold=60)
    assert verification_differences(default, default) == []
    weaker = spec({"max": 0.05}, {"min": 0.5}, hold=10, failure_limit=3, error_limit=1)
    codes = {d.code: d.weakens for d in verification_differences(default, weaker)}
    assert codes == {
        "hold_shorter": True,
        "failure_limit_higher": True,
        "signal_range_wider": True,
        "halt_range_narrower": True,
    }
    stricter = spec({"max": 0.005}, {"min": 0.1}, hold=120, failure_limit=0)
    assert not any(d.weakens for d in verification_differences(default, stricter))
    fewer = default.model_copy(update={"stop_conditions": ()})
    assert [d.code for d in verification_differences(default, fewer)] == ["stop_condition_removed"]
    changed = default.model_copy(
        update={
            "signals": (
                Signal.model_validate(
                    {"name": "error_rate", "query": "vector(0)", "pass": {"max": 1}}
                ),
            )
        }
    )
    assert [d.code for d in verification_differences(default, changed)] == ["signal_changed"]
    added = default.model_copy(
        update={
            "stop_conditions": (
                *default.stop_conditions,
                StopCondition(name="no_traffic", query="up", halt=Range(max=0)),
            )
        }
    )
    assert [(d.code, d.weakens) for d in verification_differences(default, added)] == [
        ("stop_condition_added", False)
    ]


def test_policy_input_carries_the_whole_verification() -> None:
    default = spec({"max": 0.01}, {"min": 0.3}, hold=60)
    same = verification_input(default, default)
    assert same["custom"] is False and same["weakened"] == [] and same["signals"] == 1
    assert same["plan"]["signals"][0]["query"] == Q and same["plan"]["hold"] == 60
    weaker = verification_input(default, spec({"max": 0.01}, {"min": 0.3}, hold=5))
    assert weaker["custom"] is True and weaker["weakened"] == ["hold_shorter"]


def _action(action_type: ActionType, params: dict[str, Any], **kw: Any) -> Action:
    now = T0
    return Action(
        id="01TESTACTION0000000000000A",
        action_type=action_type.name,
        target="checkout",
        environment="prod",
        params=params,
        reason="test",
        incident=Incident(),
        proposer=Identity(id="alice", kind="human"),
        state=ActionState.PENDING_APPROVAL,
        risk=action_type.risk,
        reversible=action_type.reversible,
        spec_hash="sha256:x",
        verification=kw.get("verification", action_type.verification),
        required_approvals=1,
        approver_roles=("sre",),
        created_at=now,
        updated_at=now,
        expires_at=now + timedelta(hours=1),
    )


def test_the_plan_renders_steps_and_masks_secrets() -> None:
    catalog = load_catalog(ROOT / "catalog")
    flag = catalog.get("toggle_feature_flag")
    plan = action_plan(
        _action(flag, {"flag": "new-cart", "enabled": False, "flag_service": "http://f:1"}),
        flag,
    )
    assert plan["steps"]["run"]["http"]["body"] == {"enabled": False}
    assert plan["steps"]["undo"]["http"]["body"] == {"enabled": "<captured previous_enabled>"}
    lines = plan_lines(plan)
    assert 'run: PUT http://f:1/flags/new-cart {"enabled": false}' in lines
    assert any("signal error_rate <= 0.01, reads back 60s: sum(rate(" in line for line in lines)
    captured = action_plan(
        _action(flag, {"flag": "x", "enabled": True, "flag_service": "http://f:1"}),
        flag,
        {"previous_enabled": False},
    )
    assert captured["steps"]["undo"]["http"]["body"] == {"enabled": False}
    secret_type = ActionType.model_validate(
        {
            "name": "rotate",
            "params": {"token": {"type": "string", "secret": True}},
            "run": {"argv": ["rotate", "--token={token}"]},
        }
    )
    secret_plan = action_plan(_action(secret_type, {"token": "S3CRET"}), secret_type)
    assert secret_plan["steps"]["run"]["argv"] == ["rotate", "--token=***"]
    assert "S3CRET" not in repr(secret_plan)


def test_the_plan_shows_no_param_value_nobody_can_vouch_for() -> None:
    """An action type gone from the catalog, or one whose param stopped being secret, must
    not reveal a value that was secret when the action was proposed."""
    secret_type = ActionType.model_validate(
        {
            "name": "rotate",
            "params": {"token": {"type": "string", "secret": True}},
            "run": {"argv": ["rotate", "--token={token}"]},
            "verification": {
                "signals": [
                    {"name": "ok", "query": 'up{job="{token}"}', "pass": {"min": 1}},
                ]
            },
        }
    )
    action = _action(secret_type, {"token": "S3CRET"})
    unknown = action_plan(action, None)
    assert unknown["steps"] is None
    assert "S3CRET" not in repr(unknown)
    assert '"***"' in unknown["verification"]["signals"][0]["rendered"]
    no_longer_secret = secret_type.model_copy(
        update={
            "params": {"token": secret_type.params["token"].model_copy(update={"secret": False})}
        }
    )
    recorded = action_plan(action, no_longer_secret, shown_params={"token": "***"})
    assert recorded["steps"]["run"]["argv"] == ["rotate", "--token=***"]
    assert "S3CRET" not in repr(recorded)


def test_the_plan_says_when_the_proposal_replaced_the_default() -> None:
    catalog = load_catalog(ROOT / "catalog")
    scale = catalog.get("scale_deployment")
    weaker = scale.verification.model_copy(update={"hold": 10.0})
    plan = action_plan(
        _action(scale, {"deployment": "checkout", "replicas": 3}, verification=weaker), scale
    )
    assert plan["custom"] is True
    assert plan["differences"] == [
        {"code": "hold_shorter", "message": "hold 10 instead of 120", "weakens": True}
    ]
    lines = plan_lines(plan)
    assert "the proposal replaced the action type's default verification:" in lines
    assert "  hold 10 instead of 120 (weaker)" in lines
