"""Claiming an approved action (the gate re-checks it), and taking a succeeded one back
for a manual rollback: the two ways an action comes to be held by a worker."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from opsgate.catalog import Catalog
from opsgate.errors import InvalidInput, NotFound, Refused, StateConflict
from opsgate.executor.held import MAX_REASON, Emit, HeldAction, Holdings, one_line
from opsgate.failpoints import failpoint
from opsgate.gate import Gate
from opsgate.lifecycle import record_event, record_transition
from opsgate.models import (
    Action,
    ActionState,
    ActionType,
    Approval,
    Decision,
    Execution,
    ExecutionUpdate,
    Identity,
)
from opsgate.store.base import Store, StoreTx

S = ActionState
# A worker that loses the race for a candidate looks again, at most this often per claim.
CLAIM_TRIES = 3
CANDIDATES = 20
SPREAD = 4


@dataclass(frozen=True)
class _Judgement:
    """The gate's execute decision and what it saw, to hold the claim only while true."""

    action: Action
    action_type: ActionType | None
    decision: Decision
    approvals: list[Approval]

    @property
    def active(self) -> int | None:  # running actions on the target the policy saw
        found = self.decision.input.get("context", {}).get("active_on_target")
        return found if isinstance(found, int) else None


class Claims:
    def __init__(
        self,
        store: Store,
        gate: Gate,
        holdings: Holdings,
        catalog: Callable[[], Catalog],
        *,
        worker_id: str,
        lease: float,
        clock: Callable[[], datetime],
        emit: Emit,
    ) -> None:
        self.store = store
        self.gate = gate
        self.holdings = holdings
        self.catalog = catalog
        self.worker_id = worker_id
        self.lease = lease
        self.clock = clock
        self._emit = emit
        self._spread = zlib.crc32(worker_id.encode("utf-8"))

    def claim(self, action_id: str | None, principal: Identity | None) -> Action | None:
        for _ in range(CLAIM_TRIES):
            candidate = self._candidate(action_id, self.clock())
            if candidate is None:
                return None
            # The judging moment is read after the candidate: its approvals were committed
            # before it could be read as approved, so none is later than this. A moment
            # read before would take a fresh approval for one from the future (refused).
            now = self.clock()
            catalog = self.catalog()  # read once per action, never kept across actions
            judged = self._judge(candidate, now, None, catalog)
            with self.store.transaction() as tx:
                action = _lock_for_claim(tx, candidate.id, now, explicit=action_id)
                if action is None:
                    continue  # claimed by another worker meanwhile: look again
                if not _still_true(tx, action, judged):
                    judged = self._judge(action, now, tx, catalog)
                claimed = self._hold(tx, action, now, principal, judged)
            if claimed.state is S.EXECUTING:
                failpoint("after_claim")
            return claimed
        return None

    def _candidate(self, action_id: str | None, now: datetime) -> Action | None:
        if action_id is not None:
            found = self.store.get_action(action_id)
            if found is None:
                raise NotFound(f"no action {action_id}; list them with `opsgate queue`")
            return found
        ready = [
            found
            for found in self.store.list_actions(states=[S.APPROVED], limit=CANDIDATES)
            if found.expires_at is None or now < found.expires_at
        ]
        if not ready:
            return None
        # Workers start at different places among the oldest few, so they rarely judge
        # the same action only for one of them to hold it.
        return ready[self._spread % min(len(ready), SPREAD)]

    def _judge(
        self, action: Action, now: datetime, tx: StoreTx | None, catalog: Catalog
    ) -> _Judgement:
        approvals = (tx if tx is not None else self.store).approvals_for(action.id)
        decision = self.gate.recheck(tx, action, now, catalog=catalog, approvals=approvals)
        action_type = catalog.types.get(action.action_type)
        return _Judgement(action, action_type, decision, approvals)

    def _hold(
        self,
        tx: StoreTx,
        action: Action,
        now: datetime,
        principal: Identity | None,
        judged: _Judgement,
    ) -> Action:
        """Block or start, in the claiming transaction, as judged."""
        decision = judged.decision
        tx.insert_decision(decision)
        triggered = _principal_data(principal) if principal is not None else {}
        if not decision.allow or judged.action_type is None:
            codes = list(dict.fromkeys(d.code for d in decision.deny)) or ["spec_changed"]
            blocked = record_transition(
                tx, action, S.BLOCKED_AT_EXECUTION, actor=self.worker_id, now=now,
                data={"deny": codes, "bundle_revision": decision.bundle_revision, **triggered},
            )  # fmt: skip
            why = "; ".join(d.message or d.code for d in decision.deny)
            self._emit("blocked", action.id, why, state=S.BLOCKED_AT_EXECUTION)
            return blocked
        # Rendered by the gate's recheck already, so this cannot fail here.
        held = HeldAction.of(action, judged.action_type)
        tx.insert_execution(
            Execution(
                action_id=action.id,
                target=action.target,
                environment=action.environment,
                worker_id=self.worker_id,
                claimed_at=now,
                lease_expires_at=now + timedelta(seconds=self.lease),
                heartbeat_at=now,
            )
        )
        started = record_transition(
            tx, action, S.EXECUTING, actor=self.worker_id, now=now,
            data={"worker": self.worker_id, "bundle_revision": decision.bundle_revision,
                  **triggered},
        )  # fmt: skip
        held.action = started
        self.holdings.add(held)
        self._emit("claimed", action.id, f"claimed by {self.worker_id}", state=S.EXECUTING)
        return started

    def take_back(self, action_id: str, actor: Identity, reason: str) -> HeldAction | Action:
        """`opsgate rollback`: a running action is flagged for its worker to roll back
        (returned as is); a succeeded one is held here, rolling back, to be undone."""
        if not reason.strip():
            raise InvalidInput("reason", "a rollback needs a reason")
        if len(reason) > MAX_REASON:
            raise InvalidInput("reason", f"longer than {MAX_REASON} characters")
        if actor.kind != "human":
            raise Refused("agents may propose but never roll back", ["insufficient_permissions"])
        now = self.clock()
        with self.store.transaction() as tx:
            action = tx.lock_action(action_id)
            if action is None:
                raise NotFound(f"no action {action_id}; list them with `opsgate queue`")
            execution = tx.lock_execution(action_id)
            if action.state in (S.EXECUTING, S.VERIFYING) and execution is not None:
                if execution.rollback_requested_by is None:
                    requested = ExecutionUpdate(
                        rollback_requested_by=actor.id, reason=one_line(reason)
                    )
                    tx.update_execution(action_id, requested)
                    record_event(
                        tx, action_id=action_id, kind="rollback.requested", actor=actor.id,
                        now=now, data={"reason": one_line(reason)},
                    )  # fmt: skip
                return action
            if action.state is not S.SUCCEEDED or execution is None:
                raise StateConflict(
                    f"action {action_id} is {action.state.value}; only executing, verifying "
                    "or succeeded actions can be rolled back"
                )
            action_type = self.catalog().types.get(action.action_type)
            if action_type is None or action_type.undo is None:
                raise Refused(
                    f"{action.action_type} is irreversible (no undo); it cannot be rolled back",
                    ["irreversible"],
                )
            busy = tx.count_running_on_target(
                action.target, action.environment, exclude_id=action_id
            )
            if busy:
                raise Refused(
                    f"another action is executing on {action.target} ({action.environment}); "
                    "roll back once it has finished",
                    ["concurrent_action"],
                )
            # The outcome stays `succeeded`: the verification did pass; the manual
            # rollback is its own fact (requested by, reason, rollback times).
            facts = {"reason": one_line(reason)}
            rolling = record_transition(
                tx, action, S.ROLLING_BACK, actor=actor.id, now=now, data=facts
            )
            tx.update_execution(
                action_id,
                ExecutionUpdate(
                    reason=facts["reason"],
                    worker_id=self.worker_id,
                    lease_expires_at=now + timedelta(seconds=self.lease),
                    heartbeat_at=now,
                    finished_at=None,
                    trigger_name=None,
                    trigger_kind=None,
                    trigger_value=None,
                    rollback_decided_at=now,
                    rollback_requested_by=actor.id,
                ),
            )
        held = HeldAction.of(rolling, action_type, execution.captured, execution.baseline)
        self.holdings.add(held)
        self._emit("state", action_id, f"rolling back: {reason}", state=S.ROLLING_BACK)
        return held


def _lock_for_claim(
    tx: StoreTx, action_id: str, now: datetime, *, explicit: str | None
) -> Action | None:
    """The candidate, locked, if it may still be claimed: for the worker, None when
    not (someone else took it); for `opsgate run ID`, an error that says why."""
    action = tx.lock_action(action_id)
    if explicit is None:
        if action is None or action.state is not S.APPROVED:
            return None
        if action.expires_at is not None and now >= action.expires_at:
            return None
        return action
    if action is None:
        raise NotFound(f"no action {action_id}; list them with `opsgate queue`")
    if action.state is not S.APPROVED:
        raise StateConflict(
            f"action {action_id} is {action.state.value}; only approved actions can be run"
        )
    if action.expires_at is not None and now >= action.expires_at:
        raise StateConflict(
            f"the approval of {action_id} expired at {action.expires_at}; propose it again"
        )
    return action


def _still_true(tx: StoreTx, action: Action, judged: _Judgement) -> bool:
    """The judgement holds for the locked `action`. Its approvals need no second read:
    opsgate adds them only to a pending action, under its row lock and in the
    transaction that approves it, and never removes one. So an action judged as
    approved, and locked unchanged (any field, the state included), has the approval
    rows judged; the count of running actions, though, can change meanwhile."""
    if action != judged.action or judged.action.state is not S.APPROVED:
        return False
    if judged.active is not None:
        running = tx.count_running_on_target(
            action.target, action.environment, exclude_id=action.id
        )
        if running != judged.active:
            return False
    return True


def _principal_data(principal: Identity) -> dict[str, str]:
    return {"triggered_by": principal.id, "triggered_by_kind": principal.kind}
