"""Approvals are proven again at claim, in the claiming transaction, from the approval
rows alone: a forged `approved` state, a forged or stale approval row, or an approver the
policy no longer allows runs nothing."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from opsgate.errors import StateConflict
from opsgate.lifecycle import new_id
from opsgate.models import ActionState, Approval, Identity
from opsgate.policies.embedded import EmbeddedEngine
from tests.unit.executor_rig import ALICE, BOB, CAROL, ROOT, Rig, audit_ok, scale

S = ActionState
MALLORY = Identity(id="mallory", kind="human")


def forge_approved(rig: Rig, action_id: str) -> None:
    """What `UPDATE actions SET state='approved'` does: the state, without approvals."""
    action = rig.store.get_action(action_id)
    assert action is not None
    with rig.store.transaction() as tx:
        tx.update_action(
            action_id,
            state=S.APPROVED,
            approved_at=action.created_at,
            expires_at=action.created_at + timedelta(hours=1),
        )


def forge_approval(rig: Rig, action_id: str, approver: Identity, **fields: object) -> None:
    action = rig.store.get_action(action_id)
    assert action is not None
    with rig.store.transaction() as tx:
        tx.insert_approval(
            Approval(
                id=new_id(),
                action_id=action_id,
                approver=approver,
                spec_hash=str(fields.get("spec_hash", action.spec_hash)),
                created_at=fields.get("created_at", action.created_at),  # type: ignore[arg-type]
            )
        )


def attest(rig: Rig, action_id: str, approver: Identity) -> None:
    """The `approval.added` event a genuine approval writes beside its row."""
    from opsgate.lifecycle import record_event

    action = rig.store.get_action(action_id)
    assert action is not None
    with rig.store.transaction() as tx:
        record_event(
            tx,
            action_id=action_id,
            kind="approval.added",
            actor=approver.id,
            now=action.created_at,
            data={"spec_hash": action.spec_hash},
        )


def blocked_with(rig: Rig, action_id: str, code: str) -> str:
    claimed = rig.executor.claim(action_id)
    assert claimed is not None and claimed.state is S.BLOCKED_AT_EXECUTION
    assert rig.runner.calls == []  # not even the capture step ran
    execute = [d for d in rig.store.decisions_for(action_id) if d.phase == "execute"]
    assert execute and not execute[-1].allow
    assert code in execute[-1].deny_codes
    blocked = [
        e
        for e in rig.store.audit_events(action_id=action_id)
        if e.kind == "action.blocked_at_execution"
    ]
    assert code in blocked[-1].data["deny"]
    audit_ok(rig.store)
    return next(d.message for d in execute[-1].deny if d.code == code)


def proposed(rig: Rig) -> str:
    outcome = rig.gate.propose(scale(), ALICE)
    assert outcome.action.state is S.PENDING_APPROVAL
    return outcome.action.id


def test_a_forged_approved_state_without_approvals_runs_nothing(rig: Rig) -> None:
    action_id = proposed(rig)
    forge_approved(rig, action_id)
    message = blocked_with(rig, action_id, "approval_missing")
    assert "valid approvals: 0 of 1 required" in message


def test_the_worker_loop_does_not_run_a_forged_approval_either(rig: Rig) -> None:
    action_id = proposed(rig)
    forge_approved(rig, action_id)
    claimed = rig.executor.claim()  # the oldest approved, as `opsgate worker` claims
    assert claimed is not None and claimed.id == action_id
    assert claimed.state is S.BLOCKED_AT_EXECUTION
    assert rig.runner.calls == []


def test_an_approval_by_the_proposer_or_an_agent_does_not_count(rig: Rig) -> None:
    action_id = proposed(rig)
    forge_approval(rig, action_id, ALICE)
    forge_approval(rig, action_id, Identity(id="sre-agent", kind="agent"))
    forge_approved(rig, action_id)
    message = blocked_with(rig, action_id, "approval_missing")
    assert "alice" in message and "sre-agent" in message


def test_an_approval_of_another_spec_does_not_count(rig: Rig) -> None:
    action_id = proposed(rig)
    forge_approval(rig, action_id, BOB, spec_hash="0" * 64)
    forge_approved(rig, action_id)
    blocked_with(rig, action_id, "approval_missing")


def test_an_approval_dated_before_the_proposal_or_in_the_future_does_not_count(
    rig: Rig,
) -> None:
    action_id = proposed(rig)
    action = rig.store.get_action(action_id)
    assert action is not None
    forge_approval(rig, action_id, BOB, created_at=action.created_at - timedelta(seconds=1))
    forge_approval(rig, action_id, CAROL, created_at=action.created_at + timedelta(days=1))
    forge_approved(rig, action_id)
    blocked_with(rig, action_id, "approval_missing")


def test_an_approver_unknown_to_the_policy_does_not_count(rig: Rig) -> None:
    action_id = proposed(rig)
    forge_approval(rig, action_id, MALLORY)
    forge_approved(rig, action_id)
    assert "mallory" in blocked_with(rig, action_id, "approval_missing")


def test_a_revoked_approvers_approval_no_longer_counts(rig: Rig, tmp_path: Path) -> None:
    action_id = rig.approved()  # bob approves while he is an sre
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    data = json.loads((policies / "data.json").read_text())
    del data["roles"]["bob"]
    (policies / "data.json").write_text(json.dumps(data))
    rig.gate.engine = EmbeddedEngine(policies)
    assert "bob" in blocked_with(rig, action_id, "approval_missing")


def test_fewer_approvals_than_the_action_requires_do_not_run(rig: Rig) -> None:
    outcome = rig.gate.propose(
        {
            "action": "drain_node",
            "target": "node-1",
            "environment": "staging",
            "params": {"node": "node-1"},
            "reason": "disk",
        },
        ALICE,
    )
    assert outcome.action.required_approvals == 2
    action_id = outcome.action.id
    rig.gate.approve(action_id, BOB)
    forge_approved(rig, action_id)  # one approval of two, state forged
    assert "valid approvals: 1 of 2 required" in blocked_with(rig, action_id, "approval_missing")


def test_lowering_required_approvals_in_the_row_does_not_help(rig: Rig) -> None:
    outcome = rig.gate.propose(
        {
            "action": "drain_node",
            "target": "node-1",
            "environment": "staging",
            "params": {"node": "node-1"},
            "reason": "disk",
        },
        ALICE,
    )
    action_id = outcome.action.id
    rig.gate.approve(action_id, BOB)
    with rig.store.transaction() as tx:
        tx.update_action(action_id, required_approvals=1)
    forge_approved(rig, action_id)
    # the execute-phase policy decision still asks for two
    blocked_with(rig, action_id, "approval_missing")


def test_approvals_older_than_the_ttl_do_not_count(rig: Rig) -> None:
    action_id = proposed(rig)
    action = rig.store.get_action(action_id)
    assert action is not None
    forge_approval(rig, action_id, BOB)
    attest(rig, action_id, BOB)  # a genuine approval, only old
    forge_approved(rig, action_id)
    later = action.created_at + timedelta(seconds=rig.gate.approval_ttl + 1)
    # only the approvals are stale: the forged row says it is good for a day
    with rig.store.transaction() as tx:
        tx.update_action(action_id, expires_at=later + timedelta(days=1))
    rig.gate.clock = lambda: later
    rig.executor.clock = lambda: later
    assert "expired" in blocked_with(rig, action_id, "approval_missing")


def test_an_approval_committed_while_the_worker_looks_for_work_counts(rig: Rig) -> None:
    """The race four workers hit: a worker reads its clock, then an approval commits, then
    the worker reads the action as approved. That approval is not from the future."""
    action_id = rig.approved()
    approvals = rig.store.approvals_for(action_id)
    before_the_approval = min(a.created_at for a in approvals) - timedelta(milliseconds=10)
    readings = iter([before_the_approval])
    real = rig.executor.clock
    rig.executor.clock = lambda: next(readings, None) or real()
    claimed = rig.executor.claim()
    assert claimed is not None and claimed.id == action_id
    assert claimed.state is S.EXECUTING, rig.store.decisions_for(action_id)[-1].deny


def test_genuine_approvals_run_and_the_foreground_principal_is_recorded(rig: Rig) -> None:
    action_id = rig.approved()
    claimed = rig.executor.claim(action_id, principal=CAROL)
    assert claimed is not None and claimed.state is S.EXECUTING
    rig.executor.launch(action_id)
    assert rig.executor.wait_idle(timeout=10)
    action = rig.store.get_action(action_id)
    assert action is not None and action.state is S.SUCCEEDED
    executing = [
        e for e in rig.store.audit_events(action_id=action_id) if e.kind == "action.executing"
    ]
    assert executing[0].actor == "test-worker"
    assert executing[0].data["triggered_by"] == "carol"
    assert executing[0].data["triggered_by_kind"] == "human"
    audit_ok(rig.store)


def test_an_approval_row_without_its_audit_event_does_not_count(rig: Rig) -> None:
    """A valid approver's row inserted behind opsgate's back (no `approval.added` event
    in the chain) is not an approval."""
    action_id = proposed(rig)
    forge_approval(rig, action_id, BOB)
    forge_approved(rig, action_id)
    assert "bob" in blocked_with(rig, action_id, "approval_missing")


def test_an_event_for_another_spec_does_not_attest_the_row(rig: Rig) -> None:
    from opsgate.lifecycle import record_event

    action_id = proposed(rig)
    forge_approval(rig, action_id, BOB)
    action = rig.store.get_action(action_id)
    assert action is not None
    with rig.store.transaction() as tx:
        record_event(
            tx,
            action_id=action_id,
            kind="approval.added",
            actor="bob",
            now=action.created_at,
            data={"spec_hash": "sha256:" + "1" * 64},
        )
    forge_approved(rig, action_id)
    blocked_with(rig, action_id, "approval_missing")


def test_an_approved_actions_approval_rows_are_final(rig: Rig) -> None:
    """A claim reads an approved action's approvals once, before it locks the action,
    and holds them if the action is unchanged: sound only because nothing adds an
    approval to an action that is no longer pending."""
    action_id = rig.approved()
    with pytest.raises(StateConflict, match="only pending_approval"):
        rig.gate.approve(action_id, CAROL)
    assert [a.approver.id for a in rig.store.approvals_for(action_id)] == ["bob"]
    assert rig.run(action_id) is S.SUCCEEDED
    audit_ok(rig.store)
