"""One action's life on a worker, top to bottom:

    baseline -> capture -> run -> verify -> succeed
                                         | roll back -> undo -> verify rollback -> end

`start` goes from the baseline to handing the verification to the hub. The hub measures
every action from one thread, so a verification does not block a step thread: when it
ends, the hub calls `watched`, the one continuation, which goes on by the watch's phase
(`verified` or `rollback_verified`). How each step is done and recorded is in `steps`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from opsgate.executor.held import HeldAction, one_line
from opsgate.executor.steps import Steps
from opsgate.failpoints import failpoint
from opsgate.lifecycle import ExecutionPhase, execution_phase
from opsgate.models import ActionState, ExecutionOutcome, ExecutionUpdate, VerificationSpec
from opsgate.store.base import StoreError
from opsgate.verification.evaluator import VerificationState
from opsgate.verification.hub import Watch, WatchPhase, rollback_check

log = logging.getLogger(__name__)

S = ActionState
P = ExecutionPhase
Trigger = tuple[str | None, str | None, float | None]  # name, kind, value that decided


class ActionFlow:
    """Carries held actions from the baseline to a terminal state (or hands them over)."""

    def __init__(self, steps: Steps) -> None:
        self.steps = steps
        self.store = steps.store
        self.hub = steps.hub
        self.holdings = steps.holdings
        self.worker_id = steps.worker_id
        self.clock = steps.clock

    # --- run it: baseline -> capture -> run -> verify ----------------------------------

    def start(self, held: HeldAction) -> None:
        steps = self.steps
        baseline = steps.take_baseline(held)
        if baseline is None or not steps.capture(held, baseline):
            return
        if self.holdings.draining:  # nothing has run yet: the next worker starts it cleanly
            steps.hand_over(held, f"worker {self.worker_id} is shutting down")
            return
        run_started_at = self.clock()
        if not steps.start_run(held, run_started_at, baseline):
            return
        failpoint("after_run_started")
        result, guard = steps.run(held, run_started_at)
        run_finished_at = self.clock()
        finished = ExecutionUpdate(
            run_finished_at=run_finished_at,
            run_exit_code=result.exit_code,
            run_output=result.output,
            run_error=result.error,
        )
        stopped = guard is not None and (guard.abort_reason is not None or guard.state.done)
        if result.ok and not stopped:
            # The run's end is stored with the move to verifying, in one transaction.
            now = steps.begin_verification(held, {"exit_code": result.exit_code}, ran=finished)
            fresh = steps.fresh_state(held, now, run_started_at, run_finished_at)
            self.watch(held, "verify", held.action.verification, fresh)
            return
        steps.record(held, finished, "execution.run_finished")
        if guard is not None and guard.abort_reason is not None:
            self._abandon_or_manual(held, guard)
        elif guard is not None and guard.state.done:  # a stop condition fired during run
            self._roll_back_for(held, guard.state)
        else:
            reason = one_line(f"run failed: {result.error}")
            self.roll_back(held, outcome="runner_error", reason=reason)

    # --- the hub's continuation ---------------------------------------------------------

    def watch(
        self, held: HeldAction, phase: WatchPhase, spec: VerificationSpec, state: VerificationState
    ) -> None:
        """Hand a verification to the hub; `watched` goes on once it has ended."""
        if self.holdings.draining:
            self.steps.hand_over(held, f"worker {self.worker_id} is shutting down")
            return
        held.watch = Watch(
            action_id=held.action.id,
            phase=phase,
            spec=spec,
            rendered=held.rendered,
            state=state,
            on_done=lambda done: self.holdings.submit(self.guarded, held, self.watched, held, done),
        )
        self.hub.watch(held.watch)

    def watched(self, held: HeldAction, watch: Watch) -> None:
        if watch.phase == "verify":
            self.verified(held, watch)
        elif watch.phase == "rollback":
            self.rollback_verified(held, watch)

    def verified(self, held: HeldAction, watch: Watch) -> None:
        if watch.abort_reason is not None:
            self._abandon_or_manual(held, watch)
        elif watch.state.succeeded:
            self.steps.end(held, S.SUCCEEDED, outcome="succeeded", reason=watch.state.detail)
        else:
            self._roll_back_for(held, watch.state)

    def rollback_verified(self, held: HeldAction, watch: Watch) -> None:
        if watch.abort_reason == "shutdown":
            self.steps.hand_over(held, f"worker {self.worker_id} is shutting down")
        elif watch.abort_reason is not None and watch.abort_reason != "manual":
            self.holdings.release(held, None)
        elif watch.state.succeeded:
            verified = ExecutionUpdate(rollback_verified_at=watch.state.ended_at)
            self.steps.end(held, S.ROLLED_BACK, outcome=None, reason=None, update=verified)
        else:
            reason = one_line(f"rollback not verified: {watch.state.detail}")
            self.steps.end(held, S.ROLLBACK_FAILED, outcome=None, reason=reason)

    def _abandon_or_manual(self, held: HeldAction, watch: Watch) -> None:
        if watch.abort_reason == "manual":
            execution = self.store.get_execution(held.action.id)
            self.roll_back(
                held,
                outcome="manual",
                reason=execution.reason if execution else "manual rollback",
                requested_by=execution.rollback_requested_by if execution else None,
            )
        elif watch.abort_reason == "shutdown":
            self.steps.hand_over(held, f"worker {self.worker_id} is shutting down")
        else:  # another worker owns it now: touch nothing more
            log.warning("action %s: %s; letting go", held.action.id, watch.abort_reason)
            self.holdings.release(held, None)

    # --- roll back: decide -> undo -> verify rollback -----------------------------------

    def _roll_back_for(self, held: HeldAction, state: VerificationState) -> None:
        self.roll_back(
            held,
            outcome=state.outcome or "failed_verification",
            reason=state.detail,
            trigger=(state.decided_by, state.decided_kind, state.decided_value),
        )

    def roll_back(
        self,
        held: HeldAction,
        *,
        outcome: ExecutionOutcome,
        reason: str,
        trigger: Trigger = (None, None, None),
        requested_by: str | None = None,
    ) -> None:
        """Decide the rollback (irreversible actions fail loudly instead), then undo."""
        name, kind, value = trigger
        facts = ExecutionUpdate(
            outcome=outcome,
            reason=one_line(reason),
            trigger_name=name,
            trigger_kind=kind,  # type: ignore[arg-type]
            trigger_value=value,
        )
        if self.steps.decide_rollback(held, facts, requested_by):
            self.undo(held)

    def undo(self, held: HeldAction) -> None:
        undo = held.action_type.undo
        assert undo is not None
        undo_started_at = self.clock()
        self.steps.record(
            held, ExecutionUpdate(undo_started_at=undo_started_at), "execution.undo_started"
        )
        result = self.steps.run_step(held, "undo", undo)
        undo_finished_at = self.clock()
        finished = ExecutionUpdate(
            undo_finished_at=undo_finished_at,
            undo_exit_code=result.exit_code,
            undo_output=result.output,
            undo_error=result.error,
        )
        self.steps.record(held, finished, "execution.undo_finished")
        if not result.ok:
            reason = one_line(f"undo failed: {result.error}; a human must act")
            self.steps.end(held, S.ROLLBACK_FAILED, outcome=None, reason=reason)
            return
        now = self.clock()
        fresh = self.steps.fresh_state(held, now, undo_started_at, undo_finished_at)
        self.watch(held, "rollback", rollback_check(held.action.verification), fresh)

    # --- doubt --------------------------------------------------------------------------

    def guarded(self, held: HeldAction, work: Callable[..., None], *args: Any) -> None:
        """Any unexpected error while holding an action is doubt: roll back if we can."""
        try:
            work(*args)
        except StoreError as exc:
            # The database is unreachable or refused this transaction (a restart, a
            # deadlock): nothing of it was written. That is no doubt about the action,
            # whose stored facts are intact: let go of it; its lease is no longer renewed,
            # lapses, and recovery (here or on another worker) resumes it from those facts.
            log.warning("action %s: store error, letting its lease lapse: %s", held.action.id, exc)
            self.holdings.release(held, None)
        except Exception as exc:
            log.exception("action %s: unexpected error", held.action.id)
            reason = one_line(f"internal error: {type(exc).__name__}: {exc}")
            try:
                self._after_doubt(held, reason)
            except Exception:
                log.exception("action %s: could not record the error", held.action.id)
                self.holdings.release(held, None)

    def _after_doubt(self, held: HeldAction, reason: str) -> None:
        action = self.store.get_action(held.action.id)
        if action is None:
            self.holdings.release(held, None)
            return
        phase = execution_phase(action, self.store.get_execution(action.id))
        if phase is P.NOT_STARTED:  # nothing changed: no undo needed
            self.steps.end(held, S.FAILED, outcome="runner_error", reason=reason)
        elif phase in (P.RUN_IN_FLIGHT, P.RUN_FAILED, P.RUN_FINISHED, P.VERIFYING):
            self.roll_back(held, outcome="runner_error", reason=reason)
        elif phase in (P.UNDO_PENDING, P.UNDO_FAILED, P.UNDONE):
            self.steps.end(held, S.ROLLBACK_FAILED, outcome=None, reason=reason)
        else:
            self.holdings.release(held, action.state)
