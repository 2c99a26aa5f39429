"""The spine over every store: propose -> policy -> approval, with its audit trail."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from opsgate.audit import verify_chain
from opsgate.catalog import load_catalog
from opsgate.errors import InvalidInput, NotFound, Refused, StateConflict
from opsgate.gate import Gate
from opsgate.models import ActionState, Identity
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.store import Store

ROOT = Path(__file__).resolve().parents[2]
ALICE = Identity(id="alice", kind="human")
BOB = Identity(id="bob", kind="human")
CAROL = Identity(id="carol", kind="human")
DAVE = Identity(id="dave", kind="human")
AGENT = Identity(id="sre-agent", kind="agent")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def gate(store: Store, clock: Clock) -> Gate:
    return Gate(
        store=store,
        catalog=load_catalog(ROOT / "catalog"),
        engine=EmbeddedEngine(ROOT / "policies"),
        approval_ttl=3600,
        clock=clock,
    )


def scale(replicas: int = 12, **overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "action": "scale_deployment",
        "target": "checkout",
        "environment": "prod",
        "params": {"deployment": "checkout", "replicas": replicas},
        "reason": "p99 latency over SLO",
        "incident": {"id": "INC-42", "severity": "sev2", "class": "capacity", "tier": "standard"},
    }
    document.update(overrides)
    return document


def test_allowed_proposal_waits_for_approval(gate: Gate, store: Store) -> None:
    outcome = gate.propose(scale(), ALICE)
    action, decision = outcome.action, outcome.decision
    assert action.state is ActionState.PENDING_APPROVAL
    assert decision.allow and decision.phase == "propose"
    assert decision.bundle_revision.startswith("sha256:")
    assert decision.input["action"]["params"] == {
        "deployment": "checkout",
        "namespace": "default",
        "replicas": 12,
    }
    assert decision.input["context"]["now"] == "2026-11-23T10:00:00.000000+00:00"
    assert decision.result is not None and decision.result["allow"] is True
    stored = store.get_action(action.id)
    assert stored == action
    assert [d.id for d in store.decisions_for(action.id)] == [decision.id]
    events = list(store.audit_events(action_id=action.id))
    assert [(e.from_state, e.to_state) for e in events] == [("proposed", "pending_approval")]
    assert gate.queue() == [action]


def test_blocked_proposal_is_stored_with_its_codes(gate: Gate, store: Store) -> None:
    document = scale(
        action="drain_node", params={"node": "node-1"}, target="node-1", reason="disk pressure"
    )
    outcome = gate.propose(document, AGENT)
    assert outcome.action.state is ActionState.BLOCKED
    assert "not_allowlisted" in outcome.decision.deny_codes
    assert store.get_action(outcome.action.id) is not None
    assert gate.queue() == []


def test_out_of_bounds_replicas_is_a_policy_block(gate: Gate) -> None:
    outcome = gate.propose(scale(replicas=500), ALICE)
    assert outcome.action.state is ActionState.BLOCKED
    assert outcome.decision.deny_codes == ["param_out_of_bounds"]


def test_unverifiable_proposal_is_blocked(gate: Gate) -> None:
    document = scale(verification={"signals": [], "stop_conditions": []})
    outcome = gate.propose(document, ALICE)
    assert "verification_undefined" in outcome.decision.deny_codes


def test_second_action_on_the_same_target_is_blocked(gate: Gate) -> None:
    first = gate.propose(scale(), ALICE).action
    gate.approve(first.id, BOB)
    second = gate.propose(scale(replicas=14), ALICE)
    assert "concurrent_action" in second.decision.deny_codes


BAD_INPUT = [
    ({"action": "nope"}, "target"),
    (scale(action="launch_missiles"), "action"),
    (scale(params={"deployment": "checkout"}), "params.replicas"),
    (scale(params={"deployment": "checkout", "replicas": 2, "extra": 1}), "params.extra"),
    (scale(params={"deployment": "Checkout!", "replicas": 2}), "params.deployment"),
    (scale(params={"deployment": "checkout", "replicas": "many"}), "params.replicas"),
    (scale(params={"deployment": "checkout", "replicas": 5000}), "params.replicas"),
    (scale(reason="x" * 5000), "reason"),
    (scale(reason=""), "reason"),
    (scale(colour="blue"), "colour"),
    (scale(target="bad target"), "target"),
    (scale(incident={"severity": "sev9"}), "incident.severity"),
    (scale(verification={"hold": "forever"}), "verification.hold"),
    ("just a string", "proposal"),
]


@pytest.mark.parametrize(("document", "field"), BAD_INPUT)
def test_bad_input_names_the_field_and_stores_nothing(
    gate: Gate, store: Store, document: Any, field: str
) -> None:
    before = store.row_counts()
    with pytest.raises(InvalidInput) as excinfo:
        gate.propose(document, ALICE)
    assert excinfo.value.field.startswith(field)
    assert store.row_counts() == before


def test_idempotency_key(gate: Gate, store: Store) -> None:
    first = gate.propose(scale(idempotency_key="inc-42-scale"), ALICE)
    again = gate.propose(scale(idempotency_key="inc-42-scale"), ALICE)
    assert again.existing and again.action.id == first.action.id
    before = store.row_counts()
    with pytest.raises(StateConflict):
        gate.propose(scale(replicas=13, idempotency_key="inc-42-scale"), ALICE)
    assert store.row_counts() == before


def test_approval_by_someone_else_approves(gate: Gate, store: Store) -> None:
    action = gate.propose(scale(), ALICE).action
    outcome = gate.approve(action.id, BOB, comment="looks right")
    assert outcome.action.state is ActionState.APPROVED
    assert [a.approver.id for a in outcome.approvals] == ["bob"]
    assert outcome.approvals[0].spec_hash == action.spec_hash
    kinds = [e.kind for e in store.audit_events(action_id=action.id)]
    assert kinds == ["action.pending_approval", "approval.added", "action.approved"]
    with pytest.raises(StateConflict):
        gate.approve(action.id, CAROL)


def test_self_approval_is_refused_whatever_the_policy(gate: Gate, store: Store) -> None:
    action = gate.propose(scale(), ALICE).action
    with pytest.raises(Refused) as excinfo:
        gate.approve(action.id, ALICE)
    assert excinfo.value.codes == ["self_approval"]
    assert store.get_action(action.id).state is ActionState.PENDING_APPROVAL  # type: ignore[union-attr]
    assert store.approvals_for(action.id) == []


def test_agents_never_approve(gate: Gate) -> None:
    action = gate.propose(scale(), ALICE).action
    with pytest.raises(Refused):
        gate.approve(action.id, AGENT)


def test_approver_needs_a_role(gate: Gate) -> None:
    action = gate.propose(scale(), ALICE).action
    with pytest.raises(Refused) as excinfo:
        gate.approve(action.id, DAVE)
    assert "insufficient_permissions" in excinfo.value.codes


def test_two_approvals_for_irreversible_and_duplicates_count_once(gate: Gate) -> None:
    document = scale(
        action="drain_node",
        environment="staging",
        target="node-7",
        params={"node": "node-7"},
        reason="kernel bug",
    )
    action = gate.propose(document, ALICE).action
    assert action.required_approvals == 2
    first = gate.approve(action.id, BOB)
    assert first.action.state is ActionState.PENDING_APPROVAL
    again = gate.approve(action.id, BOB)
    assert not again.counted and len(again.approvals) == 1
    done = gate.approve(action.id, CAROL)
    assert done.action.state is ActionState.APPROVED


def test_pending_actions_expire(gate: Gate, clock: Clock, store: Store) -> None:
    action = gate.propose(scale(), ALICE).action
    clock.now += timedelta(hours=1, seconds=1)
    with pytest.raises(StateConflict):
        gate.approve(action.id, BOB)
    assert store.get_action(action.id).state is ActionState.EXPIRED  # type: ignore[union-attr]
    assert store.approvals_for(action.id) == []


def test_queue_sweeps_expired(gate: Gate, clock: Clock) -> None:
    gate.propose(scale(), ALICE)
    clock.now += timedelta(hours=2)
    assert gate.queue() == []


def test_reject_and_cancel(gate: Gate) -> None:
    a = gate.propose(scale(), ALICE).action
    with pytest.raises(Refused):
        gate.reject(a.id, ALICE, "changed my mind")
    assert gate.reject(a.id, BOB, "wrong deployment").state is ActionState.REJECTED
    b = gate.propose(scale(), ALICE).action
    assert gate.cancel(b.id, ALICE, "resolved").state is ActionState.CANCELLED
    with pytest.raises(StateConflict):
        gate.cancel(b.id, ALICE)
    with pytest.raises(NotFound):
        gate.cancel("01NOPE", ALICE)


def test_audit_chain_holds_after_everything(gate: Gate, store: Store) -> None:
    a = gate.propose(scale(), ALICE).action
    gate.approve(a.id, BOB)
    gate.propose(scale(replicas=500), ALICE)
    b = gate.propose(scale(target="cart", params={"deployment": "cart", "replicas": 3}), ALICE)
    gate.reject(b.action.id, CAROL, "not now")
    report = verify_chain(store.audit_events())
    assert report.ok and report.events == 6


def test_dry_run_stores_nothing(gate: Gate, store: Store) -> None:
    before = store.row_counts()
    _, decision = gate.dry_run(scale(replicas=500), ALICE)
    assert decision.deny_codes == ["param_out_of_bounds"]
    assert store.row_counts() == before


def test_unknown_proposer_lacks_permissions(gate: Gate) -> None:
    outcome = gate.propose(scale(), Identity(id="mallory", kind="human"))
    assert "insufficient_permissions" in outcome.decision.deny_codes


def test_approval_refused_when_the_action_type_changed(gate: Gate, store: Store) -> None:
    action = gate.propose(scale(), ALICE).action
    changed = gate.catalog.types["scale_deployment"].model_copy(update={"risk": "low"})
    gate.catalog = type(gate.catalog)(
        types={**gate.catalog.types, "scale_deployment": changed}, revision="changed"
    )
    with pytest.raises(StateConflict, match="changed since"):
        gate.approve(action.id, BOB)
    assert store.approvals_for(action.id) == []
