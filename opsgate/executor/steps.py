"""The steps of an action's flow, each one store transaction with its audit events:
the baseline (stored when the run starts), capture, run (its stop conditions watched),
the start of verification (with a good run's end), the rollback decision, the end, and
handing an action over. `ActionFlow` puts them in order; this module says how each is
done and recorded."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from opsgate.executor.evidence import Baseline, measure_baseline
from opsgate.executor.held import Emit, HeldAction, Holdings, one_line
from opsgate.executor.runners import RunnerRegistry, StepResult, typed_capture
from opsgate.failpoints import failpoint
from opsgate.gate import local_decision
from opsgate.lifecycle import record_event, record_transition
from opsgate.models import (
    ActionState,
    DenyReason,
    ExecutionOutcome,
    ExecutionUpdate,
    Measurement,
    Step,
)
from opsgate.store.base import Store
from opsgate.verification.evaluator import VerificationState
from opsgate.verification.hub import VerificationHub, Watch, stop_only
from opsgate.verification.lookback import evidence_floor

S = ActionState


@dataclass
class FlowSettings:
    worker_id: str
    clock: Callable[[], datetime]
    # Configured: used as is. None: asked of the provider per verification, and
    # `fallback_scrape_interval` when it cannot say.
    scrape_interval: float | None
    fallback_scrape_interval: float


class Steps:
    def __init__(
        self,
        store: Store,
        hub: VerificationHub,
        runners: RunnerRegistry,
        holdings: Holdings,
        settings: FlowSettings,
        emit: Emit,
    ) -> None:
        self.store = store
        self.hub = hub
        self.runners = runners
        self.holdings = holdings
        self.settings = settings
        self.worker_id = settings.worker_id
        self.clock = settings.clock
        self._emit = emit

    def take_baseline(self, held: HeldAction) -> Baseline | None:
        """The baseline, measured before anything runs and stored with `run_started`
        (`start_run`): a crash before then leaves nothing to judge by, and the next
        owner, finding nothing started, measures it again. None when a relative range
        got no value: the action is then blocked at execution, having run nothing
        (never judged blind)."""
        action = held.action
        if not held.rendered:
            return NO_BASELINE
        baseline = measure_baseline(
            self.hub.provider, action.id, action.verification, held.rendered, self.clock
        )
        held.baseline = baseline.values
        if not baseline.missing:
            return baseline
        now = self.clock()
        missing = ", ".join(baseline.missing)
        message = f"no baseline for {missing}, whose range is relative to it; nothing ran"
        with self.store.transaction() as tx:
            locked = tx.lock_action(action.id)
            assert locked is not None
            tx.insert_measurements(baseline.measurements)
            deny = [DenyReason(code="baseline_unavailable", message=message)]
            tx.insert_decision(local_decision(action, deny, now))
            tx.update_execution(
                action.id,
                ExecutionUpdate(baseline=baseline.values, reason=message, finished_at=now),
            )
            held.action = record_transition(
                tx, locked, S.BLOCKED_AT_EXECUTION, actor=self.worker_id, now=now,
                data={"deny": ["baseline_unavailable"], "message": message},
            )  # fmt: skip
        self._emit("blocked", action.id, message, state=S.BLOCKED_AT_EXECUTION)
        self.holdings.release(held, S.BLOCKED_AT_EXECUTION)
        return None

    def capture(self, held: HeldAction, baseline: Baseline) -> bool:
        """The prior state the undo puts back; False (and failed, the baseline stored as
        evidence) if it cannot be had."""
        capture = held.action_type.capture
        if capture is None:
            return True
        result = self.run_step(held, "capture", capture)
        typed: Any = None
        error = result.error
        if result.ok and result.value is not None:
            try:
                typed = typed_capture(result.value, capture.type)
            except ValueError as exc:
                error = str(exc)
        if not result.ok or result.value is None or error is not None:
            reason = one_line(f"capture failed before anything ran: {error}")
            facts = ExecutionUpdate(capture_output=result.output).merged(_stored(baseline))
            self.end(
                held, S.FAILED, outcome="runner_error", reason=reason, update=facts,
                measurements=baseline.measurements,
            )  # fmt: skip
            return False
        name = capture.as_ or "captured"
        held.values[name] = typed
        captured = ExecutionUpdate(captured={name: typed}, capture_output=result.output)
        self.record(held, captured, "execution.captured")
        failpoint("after_capture")
        return True

    def start_run(self, held: HeldAction, started: datetime, baseline: Baseline) -> bool:
        """Store `run_started_at` (with the baseline) before the step starts: from then
        on, `run` may have changed something. False, and failed with nothing run, when a
        rollback was requested before the run could start."""
        update = ExecutionUpdate(run_started_at=started)
        try:
            with self.store.transaction() as tx:
                # The measurements first: their key lock on the action row comes before
                # the execution row, the order every transaction takes them in.
                tx.insert_measurements(baseline.measurements)
                execution = tx.update_execution(held.action.id, update.merged(_stored(baseline)))
                if execution.rollback_requested_by is not None:
                    raise _RollbackRequested(execution.reason or "manual rollback")
                record_event(
                    tx, action_id=held.action.id, kind="execution.run_started",
                    actor=self.worker_id, now=self.clock(), data=_audit_fields(update),
                )  # fmt: skip
        except _RollbackRequested as requested:
            why = one_line(f"rollback requested before run started: {requested.reason}")
            self.end(
                held, S.FAILED, outcome="manual", reason=why, update=_stored(baseline),
                measurements=baseline.measurements,
            )  # fmt: skip
            return False
        return True

    def run(self, held: HeldAction, started: datetime) -> tuple[StepResult, Watch | None]:
        """The run step, with its stop conditions watched meanwhile (a fired one cancels
        the step)."""
        spec = held.action.verification
        guard: Watch | None = None
        if spec.stop_conditions:
            guard = Watch(
                action_id=held.action.id,
                phase="run",
                spec=stop_only(spec),
                rendered=held.rendered,
                state=VerificationState.start(started, baseline=held.baseline),
                on_done=lambda _w: held.cancel.set(),
            )
            held.watch = guard
            self.hub.watch(guard)
        result = self.run_step(held, "run", held.action_type.run)
        if guard is not None:
            self.hub.unwatch(guard)
        return result, guard

    def begin_verification(
        self, held: HeldAction, data: dict[str, Any], ran: ExecutionUpdate | None = None
    ) -> datetime:
        """executing -> verifying, with the time verification starts and, when the run
        just ended well, its end (`ran`) with its `execution.run_finished` event."""
        now = self.clock()
        facts = ExecutionUpdate(verify_started_at=now)
        with self.store.transaction() as tx:
            locked = tx.lock_action(held.action.id)
            assert locked is not None
            # The execution row before the audit head, as every other transaction does:
            # taking them the other way round deadlocks with the heartbeat.
            tx.update_execution(held.action.id, ran.merged(facts) if ran else facts)
            if ran is not None:
                record_event(
                    tx, action_id=held.action.id, kind="execution.run_finished",
                    actor=self.worker_id, now=now, data=_audit_fields(ran),
                )  # fmt: skip
            held.action = record_transition(
                tx, locked, S.VERIFYING, actor=self.worker_id, now=now, data=data
            )
        self._emit("state", held.action.id, "verifying", state=S.VERIFYING)
        return now

    def decide_rollback(
        self,
        held: HeldAction,
        facts: ExecutionUpdate,
        requested_by: str | None,
    ) -> bool:
        """rolling_back with the facts that decided it; True when undo is to follow.
        An irreversible action fails loudly instead (and is let go)."""
        action_id = held.action.id
        now = self.clock()
        data = facts.changes()
        with self.store.transaction() as tx:
            locked = tx.lock_action(action_id)
            assert locked is not None
            if held.action_type.undo is None:
                loud = (
                    f"IRREVERSIBLE: {held.action_type.name} on {locked.target} cannot be rolled "
                    f"back ({facts.reason}); nothing was undone, a human must act now"
                )
                last = ExecutionUpdate(reason=loud, finished_at=now)
                tx.update_execution(action_id, facts.merged(last))
                held.action = record_transition(
                    tx, locked, S.FAILED, actor=self.worker_id, now=now,
                    data={**data, "irreversible": True, "message": loud},
                )  # fmt: skip
            else:
                decided = ExecutionUpdate(
                    rollback_decided_at=now, rollback_requested_by=requested_by
                )
                tx.update_execution(action_id, facts.merged(decided))
                held.action = record_transition(
                    tx, locked, S.ROLLING_BACK, actor=requested_by or self.worker_id, now=now,
                    data=data,
                )  # fmt: skip
        if held.action.state is S.FAILED:
            self._emit("state", action_id, loud, state=S.FAILED)
            self.holdings.release(held, S.FAILED)
            return False
        self._emit("state", action_id, f"rolling back: {facts.reason}", state=S.ROLLING_BACK)
        failpoint("after_rollback_decided")
        return True

    def end(
        self,
        held: HeldAction,
        state: ActionState,
        *,
        outcome: ExecutionOutcome | None,
        reason: str | None,
        update: ExecutionUpdate | None = None,
        measurements: Sequence[Measurement] = (),
    ) -> None:
        """The terminal transition and the execution's last facts, in one transaction."""
        action_id = held.action.id
        now = self.clock()
        last: dict[str, Any] = {"finished_at": now}
        if outcome is not None:
            last["outcome"] = outcome
        data: dict[str, Any] = {"outcome": outcome} if outcome else {}
        if reason is not None:
            data["reason"] = one_line(reason)
            if state in (S.ROLLBACK_FAILED, S.FAILED, S.SUCCEEDED):
                last["reason"] = one_line(reason)
        facts = ExecutionUpdate(**last)
        if update is not None:
            facts = update.merged(facts)
        with self.store.transaction() as tx:
            locked = tx.lock_action(action_id)
            assert locked is not None
            tx.insert_measurements(measurements)
            execution = tx.update_execution(action_id, facts)
            if execution.rollback_time is not None:
                data["rollback_time"] = execution.rollback_time
            held.action = record_transition(
                tx, locked, state, actor=self.worker_id, now=now, data=data
            )
        self._emit("state", action_id, reason or state.value, state=state)
        self.holdings.release(held, state)

    def hand_over(self, held: HeldAction, why: str) -> None:
        """Release the lease at once, so the next worker resumes the action."""
        now = self.clock()
        with self.store.transaction() as tx:
            execution = tx.lock_execution(held.action.id)
            if execution is not None and execution.worker_id == self.worker_id:
                tx.update_execution(held.action.id, ExecutionUpdate(lease_expires_at=now))
                record_event(
                    tx,
                    action_id=held.action.id,
                    kind="execution.released",
                    actor=self.worker_id,
                    now=now,
                    data={"why": why},
                )
        self.holdings.release(held, None)

    def run_step(self, held: HeldAction, which: str, step: Step) -> StepResult:
        self._emit("step", held.action.id, f"{which} started")
        cancel = held.cancel if which == "run" else None
        result = self.runners.run(step, held.values, secrets=held.secrets, cancel=cancel)
        status = "ok" if result.ok else f"failed: {result.error}"
        self._emit("step", held.action.id, f"{which} {status} ({result.duration:.1f}s)")
        return result

    def record(self, held: HeldAction, update: ExecutionUpdate, event: str | None = None) -> None:
        """A step's facts, with their audit event (times and codes, not the outputs)."""
        now = self.clock()
        with self.store.transaction() as tx:
            tx.update_execution(held.action.id, update)
            if event is not None:
                record_event(
                    tx, action_id=held.action.id, kind=event, actor=self.worker_id, now=now,
                    data=_audit_fields(update),
                )  # fmt: skip

    def scrape_interval(self) -> float:
        if self.settings.scrape_interval is not None:
            return self.settings.scrape_interval
        asked = self.hub.provider.scrape_interval()
        return self.settings.fallback_scrape_interval if asked is None else asked

    def fresh_state(
        self,
        held: HeldAction,
        now: datetime,
        step_started: datetime | None,
        step_finished: datetime,
    ) -> VerificationState:
        """A verification that counts signal measurements only once their data postdates
        the step (`run`, or `undo` for a rollback): docs/design.md, "Post-change
        evidence"."""
        spec = held.action.verification
        queries = [held.rendered[s.name] for s in spec.signals if s.name in held.rendered]
        floor = evidence_floor(queries, self.scrape_interval())
        anchor = step_finished
        if held.action_type.evidence_after == "run_start" and step_started is not None:
            anchor = step_started
        settled_at = now + timedelta(seconds=spec.initial_delay) if spec.initial_delay else None
        return VerificationState.start(
            now,
            evidence_from=anchor + timedelta(seconds=floor),
            settled_at=settled_at,
            baseline=held.baseline,
        )


NO_BASELINE = Baseline(values={}, measurements=[], missing=[])


class _RollbackRequested(Exception):
    """Rolls back the `run_started` transaction: a rollback was asked for first."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _stored(baseline: Baseline) -> ExecutionUpdate:
    """The baseline's values for the execution row, when there were any to measure."""
    return ExecutionUpdate(baseline=baseline.values) if baseline.measurements else ExecutionUpdate()


def _audit_fields(update: ExecutionUpdate) -> dict[str, Any]:
    """Step facts for the audit log: times and codes, not the (long) outputs."""
    return {
        key: value.isoformat() if isinstance(value, datetime) else value
        for key, value in update.changes().items()
        if not key.endswith("_output")
    }
