"""The executor over the in-memory store, a static signal provider and a fake runner:
claim and re-check, capture, run, verify, stop, roll back, fail loudly."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from opsgate.catalog import Catalog, load_catalog
from opsgate.errors import InvalidInput, Refused, StateConflict
from opsgate.executor.executor import Executor
from opsgate.executor.runners import RunnerRegistry, StepResult
from opsgate.models import ActionState
from opsgate.proposals import spec_hash
from opsgate.testing import MemoryStore
from tests.unit.executor_rig import (
    AGENT,
    ALICE,
    BOB,
    CAROL,
    ERR,
    SCALE,
    Rig,
    audit_ok,
    scale,
)

S = ActionState


def kinds(store: MemoryStore, action_id: str) -> list[str]:
    return [e.kind for e in store.audit_events(action_id=action_id)]


def test_a_good_action_runs_once_and_is_verified(rig: Rig) -> None:
    action_id = rig.approved()
    approved = rig.store.get_action(action_id)
    assert approved is not None and approved.approved_at is not None
    assert approved.expires_at is not None and approved.expires_at > approved.approved_at
    assert rig.run(action_id) is S.SUCCEEDED
    assert rig.runner.calls == [["get", "checkout"], ["scale", "checkout", "6"]]
    execution = rig.store.get_execution(action_id)
    assert execution is not None
    assert execution.captured == {"previous_replicas": "3"}
    assert execution.outcome == "succeeded" and execution.finished_at is not None
    assert execution.run_started_at is not None and execution.run_exit_code == 0
    assert execution.rollback_decided_at is None and execution.rollback_time is None
    measurements = rig.store.measurements_for(action_id)
    verify = [m for m in measurements if m.phase == "verify" and m.kind == "signal"]
    # hold 0.15 s at 0.05 s intervals: several passing measurements, never one alone.
    assert len(verify) >= 3 and all(m.outcome == "pass" for m in verify)
    assert all(m.value == pytest.approx(0.001) for m in verify)
    assert kinds(rig.store, action_id)[-6:] == [
        "action.executing",
        "execution.captured",
        "execution.run_started",
        "execution.run_finished",
        "action.verifying",
        "action.succeeded",
    ]
    execute = [d for d in rig.store.decisions_for(action_id) if d.phase == "execute"]
    assert len(execute) == 1 and execute[0].allow
    assert execute[0].input["context"]["phase"] == "execute"
    # The baseline is stored with `run_started`, and the run's end with `verifying`:
    # neither of them in an event of its own.
    assert execution.baseline == {"error_rate": 0.001, "error_spike": 0.001}
    baseline = [m for m in measurements if m.phase == "baseline"]
    assert sorted(m.name for m in baseline) == ["error_rate", "error_spike"]
    events = {e.kind: e for e in rig.store.audit_events(action_id=action_id)}
    assert set(events["execution.run_started"].data) == {"run_started_at"}
    assert events["execution.run_finished"].data["run_exit_code"] == 0
    assert "run_output" not in events["execution.run_finished"].data
    assert execution.verify_started_at is not None and execution.run_finished_at is not None
    assert execution.run_finished_at <= execution.verify_started_at
    audit_ok(rig.store)


def test_an_approval_authorizes_one_execution(rig: Rig) -> None:
    action_id = rig.approved()
    assert rig.run(action_id) is S.SUCCEEDED
    with pytest.raises(StateConflict, match="only approved actions"):
        rig.executor.claim(action_id)
    assert rig.runner.verbs().count("scale") == 1


def test_stop_condition_after_run_rolls_back_and_verifies_the_rollback(rig: Rig) -> None:
    action_id = rig.approved()
    rig.runner.effects["scale"] = lambda: rig.provider.set(
        ERR, 0.5 if len(rig.runner.calls) == 2 else 0.001
    )
    assert rig.run(action_id) is S.ROLLED_BACK
    # undo used the captured prior state
    assert rig.runner.calls[-1] == ["scale", "checkout", "3"]
    execution = rig.store.get_execution(action_id)
    assert execution is not None
    assert execution.outcome == "stopped"
    assert (execution.trigger_name, execution.trigger_kind) == ("error_spike", "stop_condition")
    assert execution.trigger_value == pytest.approx(0.5)
    assert execution.rollback_decided_at is not None
    assert execution.rollback_verified_at is not None
    assert execution.rollback_time is not None and execution.rollback_time > 0
    phases = {m.phase for m in rig.store.measurements_for(action_id)}
    assert {"verify", "rollback"} <= phases
    assert "action.rolling_back" in kinds(rig.store, action_id)
    rolled = [
        e for e in rig.store.audit_events(action_id=action_id) if e.kind == "action.rolled_back"
    ]
    assert rolled[0].data["rollback_time"] == pytest.approx(execution.rollback_time)
    audit_ok(rig.store)


def test_stop_condition_fires_while_run_is_still_running(rig: Rig) -> None:
    action_id = rig.approved()
    rig.runner.block_run = True
    rig.provider.set(ERR, 0.9)
    rig.runner.effects["scale"] = lambda: None

    def heal_on_undo() -> None:
        if rig.runner.verbs().count("scale") == 2:
            rig.provider.set(ERR, 0.001)

    rig.runner.effects["scale"] = heal_on_undo
    assert rig.run(action_id) is S.ROLLED_BACK
    execution = rig.store.get_execution(action_id)
    assert execution is not None
    assert execution.outcome == "stopped" and execution.run_error == "cancelled"
    assert execution.verify_started_at is None  # it never got to verification
    run_phase = [m for m in rig.store.measurements_for(action_id) if m.phase == "run"]
    assert run_phase and run_phase[-1].outcome == "fail"


def test_failed_run_is_rolled_back(rig: Rig) -> None:
    action_id = rig.approved()
    rig.runner.results["scale"] = StepResult(False, 1, "boom", error="exit code 1")
    rig.runner.effects["scale"] = lambda: None
    # the undo (second "scale") succeeds
    calls = {"n": 0}

    def second_succeeds() -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            rig.runner.results.pop("scale")

    rig.runner.effects["scale"] = second_succeeds
    assert rig.run(action_id) is S.ROLLED_BACK
    execution = rig.store.get_execution(action_id)
    assert execution is not None
    assert execution.outcome == "runner_error" and "exit code 1" in execution.reason
    assert execution.run_exit_code == 1 and execution.run_output == "boom"


def test_capture_failure_ends_failed_and_nothing_runs(rig: Rig) -> None:
    action_id = rig.approved()
    rig.runner.results["get"] = StepResult(False, 1, "not found", error="exit code 1")
    assert rig.run(action_id) is S.FAILED
    assert rig.runner.verbs() == ["get"]
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.run_started_at is None
    assert "capture failed before anything ran" in execution.reason
    assert execution.capture_output == "not found"
    # Measured before the capture, the baseline is kept as evidence all the same.
    assert execution.baseline == {"error_rate": 0.001, "error_spike": 0.001}
    assert {m.phase for m in rig.store.measurements_for(action_id)} == {"baseline"}
    audit_ok(rig.store)


def test_a_rollback_requested_before_the_run_starts_fails_it_with_nothing_run(
    rig: Rig,
) -> None:
    action_id = rig.approved()

    def request_during_capture() -> None:  # the run must then never start
        rig.executor.request_rollback(action_id, CAROL, "wrong deployment")

    rig.runner.effects["get"] = request_during_capture
    assert rig.run(action_id) is S.FAILED
    assert rig.runner.verbs() == ["get"]
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.run_started_at is None
    assert execution.outcome == "manual" and execution.rollback_requested_by == "carol"
    assert execution.reason == "rollback requested before run started: wrong deployment"
    assert execution.baseline == {"error_rate": 0.001, "error_spike": 0.001}
    assert {m.phase for m in rig.store.measurements_for(action_id)} == {"baseline"}
    assert "execution.run_started" not in kinds(rig.store, action_id)
    assert kinds(rig.store, action_id)[-3:] == [
        "rollback.requested",
        "execution.captured",
        "action.failed",
    ]
    audit_ok(rig.store)


def test_irreversible_action_that_fails_verification_fails_loudly(rig: Rig) -> None:
    document = {
        "action": "drain_node",
        "target": "node-1",
        "environment": "staging",
        "params": {"node": "node-1"},
        "reason": "disk pressure",
    }
    rig.provider.set('err{service="node-1"}', 0.05)  # fails the pass range, no halt
    action_id = rig.approved(document, BOB, CAROL)
    assert rig.run(action_id) is S.FAILED
    assert rig.runner.verbs() == ["drain"]  # no undo exists, none was attempted
    execution = rig.store.get_execution(action_id)
    assert execution is not None
    assert execution.outcome == "failed_verification"
    assert execution.reason.startswith("IRREVERSIBLE")
    failed = [e for e in rig.store.audit_events(action_id=action_id) if e.kind == "action.failed"]
    assert failed[0].data["irreversible"] is True


def test_silence_never_succeeds(rig: Rig) -> None:
    action_id = rig.approved()
    rig.provider.set(ERR, None)
    assert rig.run(action_id) in (S.ROLLED_BACK, S.ROLLBACK_FAILED)
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.outcome == "timeout"
    verify = [m for m in rig.store.measurements_for(action_id) if m.phase == "verify"]
    assert verify and {m.outcome for m in verify} == {"inconclusive"}
    # the rollback cannot be verified on silence either
    assert rig.store.get_action(action_id).state is S.ROLLBACK_FAILED  # type: ignore[union-attr]


def test_provider_errors_roll_back_and_are_recorded_as_such(rig: Rig) -> None:
    action_id = rig.approved()
    rig.provider.healthy = False
    assert rig.run(action_id) is S.ROLLBACK_FAILED
    execution = rig.store.get_execution(action_id)
    assert execution is not None
    assert execution.outcome == "provider_errors"
    assert "consecutive errors" in execution.reason
    assert "not verified" in (execution.reason or "") or execution.rollback_verified_at is None


def test_freeze_that_started_after_approval_blocks_at_execution(rig: Rig) -> None:
    action_id = rig.approved()
    rig.freeze.append(
        {
            "name": "black-friday",
            "start": "2000-01-01T00:00:00+00:00",
            "end": "2999-01-01T00:00:00+00:00",
            "environments": ["prod"],
        }
    )
    assert rig.run(action_id) is S.BLOCKED_AT_EXECUTION
    assert rig.runner.calls == []
    assert rig.store.get_execution(action_id) is None
    execute = [d for d in rig.store.decisions_for(action_id) if d.phase == "execute"]
    assert "change_freeze" in execute[0].deny_codes
    blocked = [e for e in rig.store.audit_events(action_id=action_id) if e.to_state]
    assert blocked[-1].data["deny"] == execute[0].deny_codes


def test_another_action_running_on_the_target_blocks_at_execution(rig: Rig) -> None:
    # Both proposed before either was approved, as two responders might.
    first = rig.gate.propose(scale(), ALICE).action.id
    second = rig.gate.propose(scale(params={"deployment": "checkout", "replicas": 7}), ALICE)
    rig.gate.approve(first, BOB)
    rig.gate.approve(second.action.id, BOB)
    second_id = second.action.id
    rig.runner.block_run = True
    claimed = rig.executor.claim(first)
    assert claimed is not None and claimed.state is S.EXECUTING
    rig.executor.launch(first)
    assert rig.runner.run_started.wait(5)
    blocked = rig.executor.claim(second_id)
    assert blocked is not None and blocked.state is S.BLOCKED_AT_EXECUTION
    execute = [d for d in rig.store.decisions_for(second_id) if d.phase == "execute"]
    assert "concurrent_action" in execute[0].deny_codes
    rig.executor.request_rollback(first, CAROL, "test over")
    assert rig.executor.wait_idle(timeout=10)


def test_changed_action_type_blocks_at_execution(rig: Rig) -> None:
    action_id = rig.approved()
    changed = (rig.catalog_dir / "scale_deployment.yaml").read_text().replace("5s", "6s")
    (rig.catalog_dir / "scale_deployment.yaml").write_text(changed)
    rig.gate.catalog = load_catalog(rig.catalog_dir)
    assert rig.run(action_id) is S.BLOCKED_AT_EXECUTION
    execute = [d for d in rig.store.decisions_for(action_id) if d.phase == "execute"]
    assert execute[0].deny_codes == ["spec_changed"]


def test_a_catalog_edited_after_the_worker_started_applies_to_the_next_action(
    rig: Rig,
) -> None:
    """The worker's gate keeps the catalog it started with; the executor reads the
    catalog per action, so an action approved under the old catalog is refused as
    changed, and one proposed under the edited catalog runs."""
    before_edit = rig.approved()
    changed = (rig.catalog_dir / "scale_deployment.yaml").read_text().replace("5s", "6s")
    (rig.catalog_dir / "scale_deployment.yaml").write_text(changed)
    today = dataclasses.replace(rig.gate, catalog=load_catalog(rig.catalog_dir))
    reads: list[int] = []

    def current_catalog() -> Catalog:
        reads.append(1)
        return load_catalog(rig.catalog_dir)

    stale = rig.executor  # reads the worker's gate's catalog, as loaded at start
    rig.executor = Executor(
        rig.store,
        rig.gate,
        rig.provider,
        RunnerRegistry({"fake": rig.runner}),
        catalog=current_catalog,
        worker_id="reloading-worker",
    )
    try:
        assert rig.run(before_edit) is S.BLOCKED_AT_EXECUTION
        execute = [d for d in rig.store.decisions_for(before_edit) if d.phase == "execute"]
        assert execute[0].deny_codes == ["spec_changed"]
        proposed = today.propose(scale(), ALICE).action.id
        today.approve(proposed, BOB)
        reads.clear()
        assert rig.run(proposed) is S.SUCCEEDED
        assert reads, "the catalog was not read for the action"
    finally:
        rig.executor.close()
        rig.executor = stale
    # Without reading the catalog per action, an action proposed today is refused.
    again = today.propose(scale(), ALICE).action.id
    today.approve(again, BOB)
    assert rig.run(again) is S.BLOCKED_AT_EXECUTION
    execute = [d for d in rig.store.decisions_for(again) if d.phase == "execute"]
    assert execute[0].deny_codes == ["spec_changed"]


def test_the_gate_recheck_names_every_reason_in_the_decision(rig: Rig) -> None:
    action_id = rig.approved()
    action = rig.store.get_action(action_id)
    assert action is not None
    now = rig.gate.clock()
    allowed = rig.gate.recheck(None, action, now)
    assert allowed.allow and allowed.phase == "execute" and allowed.action_id == action_id
    # A query that cannot be rendered: named in the stored decision, not only in the log.
    broken = action.verification.model_copy(
        update={
            "signals": tuple(
                s.model_copy(update={"query": s.query.replace("{target}", "{nowhere}")})
                for s in action.verification.signals
            )
        }
    )
    action_type = rig.gate.catalog.types[action.action_type]
    digest = spec_hash(action_type, action.target, action.environment, action.params, broken)
    unrenderable = action.model_copy(update={"verification": broken, "spec_hash": digest})
    undefined = rig.gate.recheck(None, unrenderable, now)
    assert not undefined.allow and "verification_undefined" in undefined.deny_codes
    assert "nowhere" in "; ".join(d.message for d in undefined.deny)
    # No approval rows to recount: refused, whatever the action's state says.
    unapproved = rig.gate.recheck(None, action, now, approvals=[])
    assert not unapproved.allow and unapproved.deny_codes == ["approval_missing"]
    # An action type the catalog no longer has: decided by opsgate, no policy asked.
    gone = rig.gate.recheck(None, action.model_copy(update={"action_type": "gone"}), now)
    assert gone.engine == "opsgate" and gone.deny_codes == ["spec_changed"]


def test_manual_rollback_of_a_succeeded_action(rig: Rig) -> None:
    action_id = rig.approved()
    assert rig.run(action_id) is S.SUCCEEDED
    with pytest.raises(InvalidInput, match="reason"):
        rig.executor.request_rollback(action_id, CAROL, " ")
    with pytest.raises(Refused, match="agents"):
        rig.executor.request_rollback(action_id, AGENT, "why not")
    rolling = rig.executor.request_rollback(action_id, CAROL, "customers report errors")
    assert rolling.state is S.ROLLING_BACK
    assert rig.executor.wait_idle(timeout=10)
    assert rig.store.get_action(action_id).state is S.ROLLED_BACK  # type: ignore[union-attr]
    assert rig.runner.calls[-1] == ["scale", "checkout", "3"]
    execution = rig.store.get_execution(action_id)
    assert execution is not None
    # it was verified before; the manual rollback is recorded beside that outcome
    assert execution.outcome == "succeeded" and execution.rollback_requested_by == "carol"
    assert execution.rollback_time is not None
    audit_ok(rig.store)


def test_manual_rollback_while_verifying(rig: Rig) -> None:
    rig.executor.close()
    slow = SCALE.replace("hold: 0.15s", "hold: 1s").replace("timeout: 1s", "timeout: 60s")
    (rig.catalog_dir / "scale_deployment.yaml").write_text(slow)
    rig.gate.catalog = load_catalog(rig.catalog_dir)
    rig.executor = Executor(
        rig.store,
        rig.gate,
        rig.provider,
        RunnerRegistry({"fake": rig.runner}),
        worker_id="test-worker",
    )
    action_id = rig.approved()
    claimed = rig.executor.claim(action_id)
    assert claimed is not None
    rig.executor.launch(action_id)
    for _ in range(200):
        if rig.store.get_action(action_id).state is S.VERIFYING:  # type: ignore[union-attr]
            break
        threading.Event().wait(0.02)
    rig.executor.request_rollback(action_id, CAROL, "pager says no")
    assert rig.executor.wait_idle(timeout=60)
    assert rig.store.get_action(action_id).state is S.ROLLED_BACK  # type: ignore[union-attr]
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.outcome == "manual"
    assert "rollback.requested" in kinds(rig.store, action_id)


def test_manual_rollback_refusals(rig: Rig) -> None:
    pending = rig.gate.propose(scale(), ALICE).action.id
    with pytest.raises(StateConflict, match="pending_approval"):
        rig.executor.request_rollback(pending, CAROL, "nope")


def test_an_approval_not_started_within_the_ttl_expires(rig: Rig) -> None:
    action_id = rig.gate.propose(scale(), ALICE).action.id
    rig.gate.approval_ttl = 0.0  # the approval itself starts the clock for the run
    rig.gate.approve(action_id, BOB)
    assert rig.executor.claim() is None  # claim_next_approved skips it
    expired = rig.gate.expire_due()
    assert [a.id for a in expired] == [action_id]
    assert rig.store.get_action(action_id).state is S.EXPIRED  # type: ignore[union-attr]
    assert rig.runner.calls == []


RESTART = """
name: restart_service
intent: mitigation
risk: low
params:
  deployment: {type: string, pattern: "^[a-z0-9-]{1,63}$"}
run: {runner: fake, argv: [restart, "{deployment}"], timeout: 5s}
undo: {runner: fake, argv: [restart, "{deployment}"], timeout: 5s}
verification:
  interval: 0.05s
  hold: 0.15s
  timeout: 1s
  signals:
    - {name: error_rate, query: 'err{service="{target}"}', pass: {max: 0.01, baseline_times: 0.5}}
  stop_conditions:
    - {name: error_spike, query: 'err{service="{target}"}', halt: {baseline_plus: 0.05}}
  failure_limit: 0
  error_limit: 2
"""


def with_restart(rig: Rig) -> str:
    (rig.catalog_dir / "restart_service.yaml").write_text(RESTART)
    rig.gate.catalog = load_catalog(rig.catalog_dir)
    return rig.approved(scale(action="restart_service", params={"deployment": "checkout"}))


def test_no_baseline_for_a_relative_range_blocks_before_anything_runs(rig: Rig) -> None:
    action_id = with_restart(rig)
    claimed = rig.executor.claim(action_id)
    assert claimed is not None and claimed.state is S.EXECUTING
    rig.provider.healthy = False  # Prometheus down just as the action starts
    rig.executor.launch(action_id)
    assert rig.executor.wait_idle(timeout=10)
    action = rig.store.get_action(action_id)
    assert action is not None and action.state is S.BLOCKED_AT_EXECUTION
    assert rig.runner.calls == []  # nothing ran, not even a capture
    execute = [d for d in rig.store.decisions_for(action_id) if d.phase == "execute"]
    assert execute[-1].deny_codes == ["baseline_unavailable"]
    baseline = [m for m in rig.store.measurements_for(action_id) if m.phase == "baseline"]
    assert {m.name for m in baseline} == {"error_rate", "error_spike"}
    assert all(m.value is None and m.outcome == "error" for m in baseline)
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.finished_at is not None
    assert "no baseline for error_rate, error_spike" in execution.reason
    audit_ok(rig.store)


def test_a_mitigation_is_judged_against_its_baseline(rig: Rig) -> None:
    action_id = with_restart(rig)
    rig.provider.set(ERR, 0.5)  # the incident: 50 % errors
    rig.runner.effects["restart"] = lambda: rig.provider.set(ERR, 0.2)  # better, not good
    assert rig.run(action_id) is S.SUCCEEDED  # 0.2 <= half of 0.5; 0.5 + 0.05 never reached
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.baseline == {"error_rate": 0.5, "error_spike": 0.5}
    verify = [m for m in rig.store.measurements_for(action_id) if m.phase == "verify"]
    assert any("baseline * 0.5 (0.25)" in m.detail for m in verify)


def test_a_mitigation_that_makes_it_worse_than_before_is_stopped(rig: Rig) -> None:
    action_id = with_restart(rig)
    rig.provider.set(ERR, 0.5)
    effects = iter([lambda: rig.provider.set(ERR, 0.56), lambda: rig.provider.set(ERR, 0.5)])
    rig.runner.effects["restart"] = lambda: next(effects)()
    assert rig.run(action_id) is S.ROLLED_BACK
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.outcome == "stopped"
    assert execution.trigger_name == "error_spike"
    # rolled back to where it was: verified back at the baseline (0.5 <= 1.1 * 0.5)
    assert execution.rollback_verified_at is not None
