"""Taking over an execution whose worker stopped renewing its lease, and resuming it
where its stored facts say it stands (`execution_phase`). Never starts `run` twice."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from opsgate.catalog import Catalog
from opsgate.executor.flow import ActionFlow
from opsgate.executor.held import Emit, HeldAction, Holdings, one_line
from opsgate.lifecycle import (
    ExecutionPhase,
    execution_phase,
    record_event,
    record_transition,
    run_outcome_unknown,
)
from opsgate.models import Action, ActionState, Execution, ExecutionUpdate
from opsgate.store.base import Store
from opsgate.verification.evaluator import VerificationState
from opsgate.verification.hub import rollback_check

S = ActionState
P = ExecutionPhase
# Beyond a run step's timeout, before a new owner may undo it: the step's process starts
# a moment after run_started_at is stored, and workers' clocks may differ a little.
RUN_RECOVERY_GRACE = 5.0


class Recovery:
    def __init__(
        self,
        store: Store,
        flow: ActionFlow,
        holdings: Holdings,
        catalog: Callable[[], Catalog],
        *,
        lease: float,
        emit: Emit,
    ) -> None:
        self.store = store
        self.flow = flow
        self.holdings = holdings
        self.catalog = catalog
        self.lease = lease
        self.worker_id = flow.worker_id
        self.clock = flow.clock
        self._emit = emit

    def recover_lapsed(self) -> list[str]:
        """Take over every execution whose worker stopped renewing its lease.

        Never starts `run` a second time: an action whose run may have started is
        resumed where it was (verification, rollback) or rolled back when the outcome
        of its run cannot be known.
        """
        taken: list[str] = []
        if self.holdings.draining:
            return taken
        for lapsed in self.store.lapsed_executions(self.clock()):
            if self.holdings.get(lapsed.action_id) is not None:
                continue  # ours and still being handled: the heartbeat renews it
            if self.take_over(lapsed.action_id) is not None:
                taken.append(lapsed.action_id)
        return taken

    def take_over(self, action_id: str) -> HeldAction | None:
        now = self.clock()
        catalog = self.catalog()  # read once per action, never kept across actions
        with self.store.transaction() as tx:
            action = tx.lock_action(action_id)
            execution = tx.lock_execution(action_id)
            if (
                action is None
                or execution is None
                or execution.finished_at is not None
                or execution.lease_expires_at >= now
            ):
                return None  # someone else took it, or it finished meanwhile
            if now < run_may_be_alive_until(catalog, action, execution):
                return None  # not yet: looked at again on the next poll
            dead = execution.worker_id
            execution = tx.update_execution(
                action_id,
                ExecutionUpdate(
                    worker_id=self.worker_id,
                    lease_expires_at=now + timedelta(seconds=self.lease),
                    heartbeat_at=now,
                    recovered_from=dead,
                ),
            )
            record_event(
                tx,
                action_id=action_id,
                kind="execution.recovered",
                actor=self.worker_id,
                now=now,
                data={
                    "dead_worker": dead,
                    "state": action.state.value,
                    "run_started": execution.run_may_have_started,
                    "run_finished": execution.run_finished_at is not None,
                },
            )
        action_type = catalog.types.get(action.action_type)
        if action_type is None:
            # Without its definition nothing can be run or undone safely: say so.
            self._fail_unrecoverable(action, f"action type {action.action_type} is gone")
            return None
        held = HeldAction.of(action, action_type, execution.captured, execution.baseline)
        self.holdings.add(held)
        self._emit("claimed", action_id, f"recovered from {dead}", state=action.state)
        self.holdings.submit(self.flow.guarded, held, self._resume, held, execution, dead)
        return held

    def _resume(self, held: HeldAction, execution: Execution, dead: str) -> None:
        flow, action = self.flow, held.action
        phase = execution_phase(action, execution)
        if phase is P.NOT_STARTED:
            flow.start(held)  # nothing ran yet: run it normally
        elif phase is P.RUN_IN_FLIGHT:
            why = f"worker {dead} died while run was under way; its outcome is unknown"
            flow.roll_back(held, outcome="runner_error", reason=why)
        elif phase is P.RUN_FAILED:
            why = f"run failed: {execution.run_error}"
            flow.roll_back(held, outcome="runner_error", reason=why)
        elif phase is P.RUN_FINISHED:
            now = flow.steps.begin_verification(held, {"recovered_from": dead})
            finished = execution.run_finished_at or now
            fresh = flow.steps.fresh_state(held, now, execution.run_started_at, finished)
            flow.watch(held, "verify", action.verification, fresh)
        elif phase is P.VERIFYING:
            started = execution.verify_started_at or self.clock()
            finished = execution.run_finished_at or started
            fresh = flow.steps.fresh_state(held, started, execution.run_started_at, finished)
            state = _resumed(execution.verify_state, fresh)
            flow.watch(held, "verify", action.verification, state)
        elif phase is P.UNDO_PENDING:
            # An undo puts back the captured prior state: running it again is safe,
            # leaving it half-done is not.
            flow.undo(held)
        elif phase is P.UNDO_FAILED:
            why = f"undo failed: {execution.undo_error}; a human must act"
            flow.steps.end(held, S.ROLLBACK_FAILED, outcome=None, reason=why)
        elif phase is P.UNDONE:
            undone = execution.undo_finished_at or self.clock()
            fresh = flow.steps.fresh_state(held, undone, execution.undo_started_at, undone)
            state = _resumed(execution.rollback_verify_state, fresh)
            flow.watch(held, "rollback", rollback_check(action.verification), state)
        else:  # terminal already; only the execution row was left open
            with self.store.transaction() as tx:
                tx.update_execution(action.id, ExecutionUpdate(finished_at=self.clock()))
            self.holdings.release(held, action.state)

    def _fail_unrecoverable(self, action: Action, why: str) -> None:
        now = self.clock()
        with self.store.transaction() as tx:
            locked = tx.lock_action(action.id)
            if locked is None or locked.state.terminal:
                return
            target = S.ROLLBACK_FAILED if locked.state is S.ROLLING_BACK else S.FAILED
            tx.update_execution(action.id, ExecutionUpdate(reason=one_line(why), finished_at=now))
            record_transition(
                tx, locked, target, actor=self.worker_id, now=now,
                data={"reason": why, "message": "a human must check the target"},
            )  # fmt: skip


def run_may_be_alive_until(catalog: Catalog, action: Action, execution: Execution) -> datetime:
    """Until when the run step of a lapsed execution may still be changing the target.

    A lapsed lease proves only that the worker stopped writing to the store, not that
    it is dead (a network partition, a stalled host), and its run step keeps going
    until its own timeout. Undo before then could be overtaken by the run it undoes.
    """
    # Whatever the state: a rollback decided after such a run may still be overtaken.
    if not run_outcome_unknown(execution) or execution.run_started_at is None:
        return execution.lease_expires_at
    action_type = catalog.types.get(action.action_type)
    if action_type is None:
        return execution.lease_expires_at  # nothing can be undone anyway; say so now
    return execution.run_started_at + timedelta(
        seconds=action_type.run.timeout + RUN_RECOVERY_GRACE
    )


def _resumed(stored: Mapping[str, Any] | None, fresh: VerificationState) -> VerificationState:
    """A stored verification state to continue from, minus any passing run in progress:
    nobody measured while the worker was dead, and hold counts only observed passing.
    `fresh` (the state as it would have started, with its post-change evidence rule)
    stands in when nothing usable was stored, and lends that rule to a state stored
    before the rule existed."""
    if stored is None:
        return fresh
    try:
        state = VerificationState.model_validate(dict(stored))
    except ValueError:
        return fresh
    update: dict[str, Any] = {"passing_since": None}
    if state.evidence_from is None:
        update["evidence_from"] = fresh.evidence_from
    if state.settled_at is None:
        update["settled_at"] = fresh.settled_at
    return state.model_copy(update=update)
