"""Mitigations against a real Prometheus: judged against their baseline, not a fixed
level; a change halted for being worse than before; no baseline, no run; a captured
flag restored as a JSON boolean through a strict flag API."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from opsgate.demo.service import CheckoutService
from opsgate.models import ActionState
from tests.integration.execution_rig import (
    ALICE,
    BOB,
    ERROR_RATIO,
    Rig,
    audit_ok,
    set_fault,
    wait_for_rate,
)
from tests.integration.fault_service import FaultService
from tests.integration.prom import PrometheusServer

S = ActionState
PARAMS = {"fault_url": {"type": "string", "pattern": r"^http://127\.0\.0\.1:[0-9]+$"}}


def fix_type(*, pass_: dict[str, float], halt: dict[str, float], **extra: Any) -> dict[str, Any]:
    """restart_service as a test fix: `run` heals the service, `undo` breaks it again."""
    return {
        "name": "restart_service",
        "intent": "mitigation",
        "risk": "low",
        "params": PARAMS,
        "run": {"argv": set_fault("0"), "timeout": "20s"},
        "undo": {"argv": set_fault("0.5"), "timeout": "20s"},
        "preconditions": ["error_rate_elevated"],
        "verification": {
            "interval": "1s",
            "hold": "3s",
            "timeout": "25s",
            "signals": [{"name": "error_rate", "query": ERROR_RATIO, "pass": pass_}],
            "stop_conditions": [{"name": "error_spike", "query": ERROR_RATIO, "halt": halt}],
            "failure_limit": 2,  # the shipped catalog's own, untuned
            "error_limit": 2,
            **extra,
        },
    }


def test_a_mitigation_at_fifty_percent_errors_is_verified_and_kept(
    rig: Rig, prometheus: PrometheusServer
) -> None:
    rig.define(fix_type(pass_={"max": 0.01, "baseline_times": 0.5}, halt={"baseline_plus": 0.05}))
    target = rig.service(ratio=0.5)
    wait_for_rate(prometheus, target)
    action_id = rig.approved("restart_service", target)
    assert rig.run(action_id) is S.SUCCEEDED
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.undo_started_at is None  # not undone
    assert execution.baseline is not None
    assert execution.baseline["error_rate"] == pytest.approx(0.5, abs=0.05)
    assert rig.faults.state()[target]["error_ratio"] == 0.0
    baseline = [m for m in rig.store.measurements_for(action_id) if m.phase == "baseline"]
    assert {m.name for m in baseline} == {"error_rate", "error_spike"}
    audit_ok(rig.store)


def test_the_same_fix_under_fixed_thresholds_undoes_itself(
    rig: Rig, prometheus: PrometheusServer
) -> None:
    """The regression this removes: an absolute halt below the incident's own error rate
    trips at once, and opsgate rolls the fix back, re-breaking the service."""
    rig.define(fix_type(pass_={"max": 0.01}, halt={"min": 0.3}))
    target = rig.service(ratio=0.5)
    wait_for_rate(prometheus, target)
    action_id = rig.approved("restart_service", target)
    # Undone, and the undo cannot even be verified: a fixed pass range is never met by the
    # broken state it restored.
    assert rig.run(action_id) is S.ROLLBACK_FAILED
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.outcome == "stopped"
    assert execution.trigger_name == "error_spike"
    assert execution.undo_exit_code == 0
    assert rig.faults.state()[target]["error_ratio"] == 0.5  # broken again


def test_a_change_worse_than_its_baseline_is_halted_under_the_absolute_threshold(
    rig: Rig, prometheus: PrometheusServer
) -> None:
    change = {
        "name": "scale_deployment",
        "intent": "change",
        "risk": "medium",
        "params": PARAMS,
        "run": {"argv": set_fault("0.12"), "timeout": "20s"},
        "undo": {"argv": set_fault("0"), "timeout": "20s"},
        "verification": {
            "interval": "1s",
            "hold": "3s",
            "timeout": "25s",
            # 12 % passes this lenient absolute signal: only "worse than before" catches it
            "signals": [{"name": "error_rate", "query": ERROR_RATIO, "pass": {"max": 0.2}}],
            "stop_conditions": [
                {"name": "error_spike", "query": ERROR_RATIO, "halt": {"baseline_plus": 0.05}}
            ],
            "failure_limit": 2,
            "error_limit": 2,
        },
    }
    rig.define(change)
    target = rig.service(ratio=0.0)
    wait_for_rate(prometheus, target)
    action_id = rig.approved("scale_deployment", target)
    assert rig.run(action_id) is S.ROLLED_BACK
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.outcome == "stopped"
    assert execution.trigger_value is not None and 0.05 <= execution.trigger_value < 0.2
    assert rig.faults.state()[target]["error_ratio"] == 0.0


def test_no_baseline_blocks_the_action_before_anything_runs(
    tmp_path: Path,
    sqlite_url: str,
    prometheus_factory: Callable[..., PrometheusServer],
    fault_service: FaultService,
) -> None:
    own = prometheus_factory()
    rig = Rig(tmp_path, sqlite_url, own, fault_service)
    try:
        ran = tmp_path / "ran.txt"
        document = fix_type(
            pass_={"max": 0.01, "baseline_times": 0.5}, halt={"baseline_plus": 0.05}
        )
        document["run"] = {"argv": ["touch", str(ran)], "timeout": "5s"}
        rig.define(document)
        target = rig.service(ratio=0.5)
        wait_for_rate(own, target)
        action_id = rig.approved("restart_service", target)
        assert rig.executor is not None
        claimed = rig.executor.claim(action_id)
        assert claimed is not None and claimed.state is S.EXECUTING
        own.stop()  # Prometheus goes away between the claim and the start
        rig.executor.launch(action_id)
        assert rig.executor.wait_idle(timeout=60)
        action = rig.store.get_action(action_id)
        assert action is not None and action.state is S.BLOCKED_AT_EXECUTION
        assert not ran.exists()  # nothing ran
        decisions = [d for d in rig.store.decisions_for(action_id) if d.phase == "execute"]
        assert decisions[-1].deny_codes == ["baseline_unavailable"]
        audit_ok(rig.store)
    finally:
        rig.close()


@pytest.fixture
def flag_api() -> Iterator[tuple[CheckoutService, str]]:
    service = CheckoutService("flags").start()
    try:
        assert service._server is not None
        host, port = service._server.server_address[:2]
        yield service, f"http://{host}:{port}"
    finally:
        service.stop()


def flag_type(capture_type: str | None) -> dict[str, Any]:
    capture: dict[str, Any] = {
        "http": {
            "method": "GET",
            "url": "{flag_service}/flags/{flag}",
            "expect_status": [200],
            "extract": "enabled",
        },
        "as": "previous_enabled",
    }
    if capture_type is not None:
        capture["type"] = capture_type
    put = {"method": "PUT", "url": "{flag_service}/flags/{flag}", "expect_status": [200]}
    return {
        "name": "toggle_feature_flag",
        "risk": "low",
        "params": {
            "flag": {"type": "string", "pattern": "^[a-z0-9-]{1,63}$"},
            "enabled": {"type": "boolean"},
            "flag_service": {"type": "string", "pattern": r"^http://127\.0\.0\.1:[0-9]+$"},
        },
        "capture": capture,
        "run": {"http": {**put, "body": {"enabled": "{enabled}"}}},
        "undo": {"http": {**put, "body": {"enabled": "{previous_enabled}"}}},
        "verification": {
            "interval": "1s",
            "hold": "1s",
            "timeout": "15s",
            "signals": [{"name": "healthy", "query": "vector(0)", "pass": {"max": 0}}],
            # fires at the first look: every run here is rolled back
            "stop_conditions": [{"name": "always", "query": "vector(1)", "halt": {"min": 1}}],
            "failure_limit": 0,
            "error_limit": 2,
        },
    }


@pytest.mark.parametrize(("capture_type", "restored"), [("boolean", True), (None, False)])
def test_a_captured_flag_goes_back_as_a_json_boolean(
    rig: Rig,
    flag_api: tuple[CheckoutService, str],
    capture_type: str | None,
    restored: bool,
) -> None:
    """A strict flag API refuses the string "false": typed, the undo restores the flag;
    untyped (as before), the rollback fails and the flag stays on."""
    service, url = flag_api
    rig.define(flag_type(capture_type))
    assert rig.gate is not None
    outcome = rig.gate.propose(
        {
            "action": "toggle_feature_flag",
            "target": "checkout",
            "environment": "staging",
            "params": {"flag": "dark-mode", "enabled": True, "flag_service": url},
            "reason": "integration test",
        },
        ALICE,
    )
    assert outcome.action.state is S.PENDING_APPROVAL, outcome.decision.deny
    rig.gate.approve(outcome.action.id, BOB)
    final = rig.run(outcome.action.id)
    execution = rig.store.get_execution(outcome.action.id)
    assert execution is not None
    if restored:
        assert final is S.ROLLED_BACK
        assert execution.captured == {"previous_enabled": False}
        assert service.flags()["dark-mode"] is False
    else:
        assert final is S.ROLLBACK_FAILED
        assert execution.captured == {"previous_enabled": "false"}
        assert execution.undo_error is not None and "400" in execution.undo_error
        assert service.flags()["dark-mode"] is True  # what the bug left behind
