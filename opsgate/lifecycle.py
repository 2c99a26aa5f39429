"""The lifecycle graph and the one way to move an action along it."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from ulid import ULID

from opsgate.audit import AuditDraft
from opsgate.errors import StateConflict
from opsgate.models import Action, ActionState, Execution
from opsgate.store.base import Store, StoreTx

S = ActionState

# Every edge of the lifecycle (docs/design.md, "Lifecycle"); anything else is refused.
TRANSITIONS: dict[ActionState, frozenset[ActionState]] = {
    S.PROPOSED: frozenset({S.BLOCKED, S.PENDING_APPROVAL}),
    S.PENDING_APPROVAL: frozenset({S.APPROVED, S.REJECTED, S.EXPIRED, S.CANCELLED}),
    S.APPROVED: frozenset({S.EXECUTING, S.BLOCKED_AT_EXECUTION, S.CANCELLED, S.EXPIRED}),
    # executing -> blocked_at_execution only before anything ran: no baseline to judge by.
    S.EXECUTING: frozenset({S.VERIFYING, S.ROLLING_BACK, S.FAILED, S.BLOCKED_AT_EXECUTION}),
    S.VERIFYING: frozenset({S.SUCCEEDED, S.ROLLING_BACK, S.FAILED}),
    # A manual rollback of a verified action is allowed (`opsgate rollback`).
    S.SUCCEEDED: frozenset({S.ROLLING_BACK}),
    S.ROLLING_BACK: frozenset({S.ROLLED_BACK, S.ROLLBACK_FAILED}),
}


class ExecutionPhase(enum.StrEnum):
    """Where an execution stands, from its action's state and the step times stored
    before and after each step: what recovery resumes and what doubt rolls back."""

    NOT_STARTED = "not_started"  # executing, `run` not started: nothing has changed
    RUN_IN_FLIGHT = "run_in_flight"  # `run` started, its end not stored: outcome unknown
    RUN_FAILED = "run_failed"  # `run` ended with an error
    # `run` ended well, verification not started: only after a run aborted by shutdown,
    # a lost lease or a manual request, as a good run's end is stored with `verifying`.
    RUN_FINISHED = "run_finished"
    VERIFYING = "verifying"
    UNDO_PENDING = "undo_pending"  # rollback decided, undo not finished (safe to redo)
    UNDO_FAILED = "undo_failed"
    UNDONE = "undone"  # undo ended well: the rollback is being verified
    FINISHED = "finished"  # the action is terminal
    NOT_EXECUTING = "not_executing"  # approved, blocked...: no execution to resume


def run_outcome_unknown(execution: Execution) -> bool:
    """`run` may have started and its end was never stored: it may still be going."""
    return execution.run_may_have_started and execution.run_finished_at is None


def execution_phase(action: Action, execution: Execution | None) -> ExecutionPhase:
    """The one reading of an execution's nullable step times (docs/design.md, "Recovery").

    Fail closed: an executing action without an execution row is taken as a run that
    may have started, so nobody starts it again.
    """
    P = ExecutionPhase
    if action.state.terminal:
        return P.FINISHED
    if action.state is S.VERIFYING:
        return P.VERIFYING
    if action.state is S.ROLLING_BACK:
        if execution is None or execution.undo_finished_at is None:
            return P.UNDO_PENDING
        return P.UNDONE if execution.undo_error is None else P.UNDO_FAILED
    if action.state is not S.EXECUTING:
        return P.NOT_EXECUTING
    if execution is None or run_outcome_unknown(execution):
        return P.RUN_IN_FLIGHT
    if not execution.run_may_have_started:
        return P.NOT_STARTED
    return P.RUN_FINISHED if execution.run_error is None else P.RUN_FAILED


def can_transition(from_state: ActionState, to_state: ActionState) -> bool:
    return to_state in TRANSITIONS.get(from_state, frozenset())


def check_transition(action: Action, to_state: ActionState) -> None:
    if not can_transition(action.state, to_state):
        raise StateConflict(
            f"action {action.id} is {action.state.value}; it cannot become {to_state.value}"
        )


def new_id() -> str:
    return str(ULID())


def record_transition(
    tx: StoreTx,
    action: Action,
    to_state: ActionState,
    *,
    actor: str,
    now: datetime,
    data: dict[str, Any] | None = None,
    **fields: Any,
) -> Action:
    """Move a locked action to `to_state` and append its audit event, in the caller's tx."""
    check_transition(action, to_state)
    updated = tx.update_action(action.id, state=to_state, updated_at=now, **fields)
    # Sealed at commit: the chain's head, which every writer queues on, is then held
    # for the write and COMMIT only.
    tx.append_audit_at_commit(
        AuditDraft(
            id=new_id(),
            at=now,
            action_id=action.id,
            kind=f"action.{to_state.value}",
            actor=actor,
            from_state=action.state.value,
            to_state=to_state.value,
            data=data or {},
        )
    )
    return updated


SYSTEM_ACTOR = "opsgate"


def expire_if_due(tx: StoreTx, action: Action, now: datetime) -> Action | None:
    """Expire a locked pending or approved action whose window has passed."""
    if (
        action.state in (ActionState.PENDING_APPROVAL, ActionState.APPROVED)
        and action.expires_at is not None
        and now >= action.expires_at
    ):
        return record_transition(
            tx,
            action,
            ActionState.EXPIRED,
            actor=SYSTEM_ACTOR,
            now=now,
            data={"expires_at": action.expires_at.isoformat()},
        )
    return None


def expire_due(store: Store, now: datetime) -> list[Action]:
    """Expire pending actions past their approval TTL, and approved ones not started
    within it: needs only the store, so reading commands need no catalog or engine."""
    expired: list[Action] = []
    for candidate in store.due_for_expiry(now):
        with store.transaction() as tx:
            action = tx.lock_action(candidate.id)
            if action is not None:
                done = expire_if_due(tx, action, now)
                if done is not None:
                    expired.append(done)
    return expired


def record_event(
    tx: StoreTx,
    *,
    action_id: str | None,
    kind: str,
    actor: str,
    now: datetime,
    data: dict[str, Any] | None = None,
    from_state: str | None = None,
    to_state: str | None = None,
) -> None:
    """An audit event outside `record_transition`: a creation, an approval, a refusal."""
    tx.append_audit_at_commit(
        AuditDraft(
            id=new_id(),
            at=now,
            action_id=action_id,
            kind=kind,
            actor=actor,
            from_state=from_state,
            to_state=to_state,
            data=data or {},
        )
    )
