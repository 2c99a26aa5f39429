"""Run approved actions: claim, re-check, capture, run, verify, and roll back by itself.

Every step starts and ends with one store transaction that also appends its audit
event, and the time a step starts is stored *before* it starts, so a new owner of a
lapsed lease knows whether `run` may have happened. Runner steps (capture, run, undo)
use a small thread pool; verification of every action is measured by one
`VerificationHub` thread, which hands a finished verification back to the pool.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from opsgate.errors import InvalidInput, NotFound, Refused, StateConflict
from opsgate.executor.runners import RunnerRegistry, StepResult, typed_capture
from opsgate.failpoints import failpoint
from opsgate.gate import Gate
from opsgate.lifecycle import new_id, record_event, record_transition
from opsgate.models import (
    Action,
    ActionState,
    ActionType,
    Approval,
    Decision,
    DenyReason,
    Execution,
    ExecutionOutcome,
    Identity,
    Measurement,
    Proposal,
    Step,
    VerificationSpec,
    WorkerInfo,
)
from opsgate.proposals import ValidatedProposal, spec_hash
from opsgate.store.base import Store, StoreError, StoreTx
from opsgate.verification.evaluator import VerificationState
from opsgate.verification.hub import (
    TickReport,
    VerificationHub,
    Watch,
    WatchPhase,
    rollback_check,
    stop_only,
)
from opsgate.verification.lookback import evidence_floor
from opsgate.verification.promql import render_query
from opsgate.verification.provider import PROMETHEUS_DEFAULT_SCRAPE_INTERVAL

log = logging.getLogger(__name__)

S = ActionState
MAX_REASON = 2000
# Beyond a run step's timeout, before a new owner may undo it: the step's process starts
# a moment after run_started_at is stored, and workers' clocks may differ a little.
RUN_RECOVERY_GRACE = 5.0
# A worker that loses the race for a candidate looks again, at most this often per claim.
CLAIM_TRIES = 3
CANDIDATES = 20
SPREAD = 4
_STATE_FIELD: dict[WatchPhase, str] = {
    "verify": "verify_state",
    "rollback": "rollback_verify_state",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{new_id()[-6:].lower()}"


def step_values(action: Action, captured: Mapping[str, Any]) -> dict[str, Any]:
    """What `{placeholders}` in steps and queries may name."""
    return {
        **action.params,
        **captured,
        "target": action.target,
        "environment": action.environment,
    }


def secret_values(action_type: ActionType, params: Mapping[str, Any]) -> list[str]:
    return [
        str(params[name])
        for name, spec in action_type.params.items()
        if spec.secret and params.get(name) not in (None, "")
    ]


def render_queries(spec: VerificationSpec, values: Mapping[str, Any]) -> dict[str, str]:
    """Each signal's and stop condition's PromQL with values as escaped label values."""
    scalars = {k: v for k, v in values.items() if isinstance(v, str | int | float | bool)}
    rendered: dict[str, str] = {}
    queries = [(s.name, s.query) for s in spec.signals]
    queries += [(c.name, c.query) for c in spec.stop_conditions]
    for name, query in queries:
        try:
            rendered[name] = render_query(query, scalars)
        except ValueError as exc:
            raise ValueError(f"verification query {name}: {exc}") from None
    return rendered


def _one_line(text: str | None, limit: int = MAX_REASON) -> str:
    line = " ".join((text or "").split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclass(frozen=True)
class ExecutorEvent:
    """Something a live view or the worker log may show."""

    kind: str  # claimed | blocked | step | measured | state | finished
    action_id: str
    message: str = ""
    watch: Watch | None = None
    state: ActionState | None = None


@dataclass
class _Held:
    """What this worker holds for one action while it runs."""

    action: Action
    action_type: ActionType
    values: dict[str, Any]
    secrets: list[str]
    rendered: dict[str, str]
    cancel: threading.Event = field(default_factory=threading.Event)
    watch: Watch | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    baseline: dict[str, float | None] = field(default_factory=dict)
    final_state: ActionState | None = None


class Executor:
    """A worker's engine: holds leases, runs steps, feeds the hub, records everything."""

    def __init__(
        self,
        store: Store,
        gate: Gate,
        hub: VerificationHub,
        runners: RunnerRegistry | None = None,
        *,
        worker_id: str | None = None,
        lease: float = 30.0,
        concurrency: int = 4,
        clock: Callable[[], datetime] = utcnow,
        on_event: Callable[[ExecutorEvent], None] | None = None,
        scrape_interval: float | None = None,
        fallback_scrape_interval: float = PROMETHEUS_DEFAULT_SCRAPE_INTERVAL,
    ) -> None:
        self.store = store
        # Configured: used as is. None: asked of the provider per verification, and
        # `fallback_scrape_interval` when it cannot say.
        self.scrape_interval = scrape_interval
        self.fallback_scrape_interval = fallback_scrape_interval
        self.gate = gate
        self.hub = hub
        self.runners = runners or RunnerRegistry()
        self.worker_id = worker_id or default_worker_id()
        self.lease = lease
        self.clock = clock
        self.on_event = on_event
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="opsgate-step")
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._heartbeat_stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._started = False
        self._draining = False
        self._spread = zlib.crc32(self.worker_id.encode("utf-8"))
        hub.sink = self._store_tick

    # --- the worker itself --------------------------------------------------------------

    def start(self) -> None:
        """Register this worker and start renewing its leases."""
        if self._started:
            return
        self._started = True
        now = self.clock()
        self.store.register_worker(
            WorkerInfo(
                id=self.worker_id,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                started_at=now,
                heartbeat_at=now,
            )
        )
        self._heartbeat = threading.Thread(target=self._beat, name="opsgate-lease", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._heartbeat_stop.wait(self.lease / 3):
            now = self.clock()
            with self._lock:
                holding = list(self._held)
            try:
                self.store.renew_leases(
                    self.worker_id, now, now + timedelta(seconds=self.lease), only=holding
                )
            except StoreError as exc:  # the database may be restarting: keep trying
                log.warning("lease renewal failed: %s", exc)

    def close(self) -> None:
        # Hub first, so no finished verification is handed to a pool that is shutting
        # down; draining makes a step that ends meanwhile hand its action over.
        self._draining = True
        self._heartbeat_stop.set()
        self.hub.close()
        self._pool.shutdown(wait=True)
        if self._started:
            try:
                self.store.stop_worker(self.worker_id, self.clock())
            except StoreError as exc:
                log.warning("could not mark worker %s stopped: %s", self.worker_id, exc)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._held)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every action this worker holds has reached a terminal state."""
        while True:
            with self._lock:
                pending = [h.finished for h in self._held.values()]
            if not pending:
                return True
            if not pending[0].wait(timeout):
                return False

    def wait_for(self, action_id: str, timeout: float | None = None) -> ActionState | None:
        with self._lock:
            held = self._held.get(action_id)
        if held is None:
            action = self.store.get_action(action_id)
            return action.state if action else None
        held.finished.wait(timeout)
        return held.final_state

    def _emit(self, kind: str, action_id: str, message: str = "", **extra: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(ExecutorEvent(kind, action_id, message, **extra))
            except Exception:  # a broken display must never break an execution
                log.exception("event listener failed")

    # --- claiming -----------------------------------------------------------------------

    def claim(
        self, action_id: str | None = None, *, principal: Identity | None = None
    ) -> Action | None:
        """Claim one approved action (this one, or the oldest), re-check it, hold it.

        The re-check (preconditions, policy, approvals) is judged with no transaction
        open, so a slow policy or a hung Prometheus never holds the store's write lock;
        the claiming transaction then holds it only if what the judgement saw is still
        true (state, running actions on the target, approval rows), else judges again
        under the lock. `principal` is who asked for this run in the foreground
        (`opsgate run`); it is recorded beside the worker. Returns the action as
        executing or blocked_at_execution; None if nothing was approved.
        """
        for _ in range(CLAIM_TRIES):
            now = self.clock()
            candidate = self._candidate(action_id, now)
            if candidate is None:
                return None
            judged = self._judge(candidate, now, None)
            with self.store.transaction() as tx:
                action = self._lock_for_claim(tx, candidate.id, now, explicit=action_id)
                if action is None:
                    continue  # claimed by another worker meanwhile: look again
                if not _still_true(tx, action, judged):
                    judged = self._judge(action, now, tx)
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

    @staticmethod
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

    def launch(self, action_id: str) -> None:
        """Start running a held (executing) action in the step pool."""
        with self._lock:
            held = self._held[action_id]
        self._pool.submit(self._guarded, held, self._capture_and_run, held)

    def _judge(self, action: Action, now: datetime, tx: StoreTx | None) -> _Judgement:
        """Policy, preconditions and approvals again, as the world is now."""
        action_type = self.gate.catalog.types.get(action.action_type)
        values = step_values(action, {})
        deny: list[DenyReason] = []
        rendered: dict[str, str] = {}
        reader = tx if tx is not None else self.store
        approvals = reader.approvals_for(action.id)
        current = (
            spec_hash(
                action_type, action.target, action.environment, action.params, action.verification
            )
            if action_type is not None
            else None
        )
        if action_type is None or current != action.spec_hash:
            deny.append(
                DenyReason(
                    code="spec_changed",
                    message=f"action type {action.action_type} changed since approval; "
                    "propose it again",
                )
            )
            return _Judgement(
                action, action_type, values, rendered, deny, _local_decision(action, deny, now),
                None, approvals,
            )  # fmt: skip
        try:
            rendered = render_queries(action.verification, values)
        except ValueError as exc:
            deny.append(DenyReason(code="verification_undefined", message=str(exc)))
        spec = ValidatedProposal(
            proposal=_proposal_of(action),
            action_type=action_type,
            params=dict(action.params),
            verification=action.verification,
            spec_hash=action.spec_hash,
        )
        evaluation = self.gate.evaluate(
            spec, action.proposer, phase="execute", exclude_id=action.id, now=now, tx=tx
        )
        decision = evaluation.decision(action_id=action.id, phase="execute", at=now)
        if not decision.allow:
            deny.extend(decision.deny or (DenyReason(code="policy_engine_unavailable"),))
        # From the approval rows alone; the claim holds them only if they are unchanged.
        attested = {
            (event.actor, str(event.data.get("spec_hash")))
            for event in self.store.audit_events(action_id=action.id)
            if event.kind == "approval.added"
        }
        missing = self.gate.prove_approvals(
            approvals, action, evaluation.input, decision.required_approvals, now, attested
        )
        if missing is not None:
            deny.append(missing)
            # Stored with the execute decision, so `run` and `show` name it.
            decision = decision.model_copy(
                update={"allow": False, "deny": (*decision.deny, missing)}
            )
        active = evaluation.input.get("context", {}).get("active_on_target")
        return _Judgement(action, action_type, values, rendered, deny, decision, active, approvals)

    def _hold(
        self,
        tx: StoreTx,
        action: Action,
        now: datetime,
        principal: Identity | None,
        judged: _Judgement,
    ) -> Action:
        """Block or start, in the claiming transaction, as judged."""
        action_type, values, rendered = judged.action_type, judged.values, judged.rendered
        deny, decision = judged.deny, judged.decision
        tx.insert_decision(decision)
        if deny:
            codes = list(dict.fromkeys(d.code for d in deny))
            blocked = record_transition(
                tx,
                action,
                S.BLOCKED_AT_EXECUTION,
                actor=self.worker_id,
                now=now,
                data={
                    "deny": codes,
                    "bundle_revision": decision.bundle_revision,
                    **(_principal_data(principal) if principal is not None else {}),
                },
            )
            self._emit(
                "blocked",
                action.id,
                "; ".join(d.message or d.code for d in deny),
                state=S.BLOCKED_AT_EXECUTION,
            )
            return blocked
        assert action_type is not None
        execution = Execution(
            action_id=action.id,
            target=action.target,
            environment=action.environment,
            worker_id=self.worker_id,
            claimed_at=now,
            lease_expires_at=now + timedelta(seconds=self.lease),
            heartbeat_at=now,
        )
        tx.insert_execution(execution)
        started = record_transition(
            tx,
            action,
            S.EXECUTING,
            actor=self.worker_id,
            now=now,
            data={
                "worker": self.worker_id,
                "bundle_revision": decision.bundle_revision,
                **(_principal_data(principal) if principal is not None else {}),
            },
        )
        with self._lock:
            self._held[action.id] = _Held(
                action=started,
                action_type=action_type,
                values=values,
                secrets=secret_values(action_type, action.params),
                rendered=rendered,
            )
        self._emit("claimed", action.id, f"claimed by {self.worker_id}", state=S.EXECUTING)
        return started

    # --- steps --------------------------------------------------------------------------

    def _guarded(self, held: _Held, work: Callable[..., None], *args: Any) -> None:
        """Any unexpected error while holding an action is doubt: roll back if we can."""
        try:
            work(*args)
        except StoreError as exc:
            # The database is unreachable or refused this transaction (a restart, a
            # deadlock): nothing of it was written. That is no doubt about the action,
            # whose stored facts are intact: let go of it; its lease is no longer renewed,
            # lapses, and recovery (here or on another worker) resumes it from those facts.
            log.warning("action %s: store error, letting its lease lapse: %s", held.action.id, exc)
            self._release(held, None)
        except Exception as exc:
            log.exception("action %s: unexpected error", held.action.id)
            reason = _one_line(f"internal error: {type(exc).__name__}: {exc}")
            try:
                self._after_doubt(held, reason)
            except Exception:
                log.exception("action %s: could not record the error", held.action.id)
                self._release(held, None)

    def _after_doubt(self, held: _Held, reason: str) -> None:
        action = self.store.get_action(held.action.id)
        if action is None or action.state.terminal:
            self._release(held, action.state if action else None)
        elif action.state in (S.EXECUTING, S.VERIFYING):
            execution = self.store.get_execution(action.id)
            if execution is not None and execution.run_started_at is None:
                self._end(held, S.FAILED, outcome="runner_error", reason=reason)
            else:
                self._roll_back(held, outcome="runner_error", reason=reason)
        elif action.state is S.ROLLING_BACK:
            self._end(held, S.ROLLBACK_FAILED, outcome=None, reason=reason)
        else:
            self._release(held, action.state)

    def _run_step(self, held: _Held, which: str, step: Step) -> StepResult:
        self._emit("step", held.action.id, f"{which} started")
        cancel = held.cancel if which == "run" else None
        result = self.runners.run(step, held.values, secrets=held.secrets, cancel=cancel)
        status = "ok" if result.ok else f"failed: {result.error}"
        self._emit("step", held.action.id, f"{which} {status} ({result.duration:.1f}s)")
        return result

    def _update(self, action_id: str, event: str | None = None, **fields: Any) -> Execution:
        now = self.clock()
        with self.store.transaction() as tx:
            execution = tx.update_execution(action_id, **fields)
            if event is not None:
                record_event(
                    tx,
                    action_id=action_id,
                    kind=event,
                    actor=self.worker_id,
                    now=now,
                    data=_audit_fields(fields),
                )
        return execution

    def _measure_baseline(self, held: _Held) -> bool:
        """Every signal and stop condition once, just before anything runs: the values
        relative ranges are judged against (docs/design.md, "Baseline"). Stored as
        evidence. False when a relative range got no value: the action is then blocked
        at execution, having run nothing (never judged blind)."""
        action = held.action
        spec = action.verification
        queries = list(dict.fromkeys(held.rendered.values()))
        if not queries:
            return True
        results = self.hub.provider.query_many(queries)
        now = self.clock()
        baseline: dict[str, float | None] = {}
        measurements: list[Measurement] = []
        kinds = [(s.name, "signal", s.pass_.relative) for s in spec.signals]
        kinds += [(c.name, "stop_condition", c.halt.relative) for c in spec.stop_conditions]
        missing: list[str] = []
        for name, kind, relative in kinds:
            query = held.rendered.get(name)
            result = results.get(query) if query is not None else None
            value = result.value if result is not None and result.error is None else None
            if value is not None and not math.isfinite(value):
                value = None
            baseline[name] = value
            if value is None and relative:
                missing.append(name)
            error = result.error if result is not None else "no result"
            measurements.append(
                Measurement(
                    action_id=action.id,
                    phase="baseline",
                    name=name,
                    kind=kind,  # type: ignore[arg-type]
                    at=now,
                    value=value,
                    outcome="pass" if value is not None else ("error" if error else "inconclusive"),
                    detail=(
                        f"baseline {value:g}"
                        if value is not None
                        else f"no baseline: {error or 'no data'}"
                    ),
                )
            )
        held.baseline = baseline
        with self.store.transaction() as tx:
            locked = tx.lock_action(action.id)
            assert locked is not None
            tx.insert_measurements(measurements)
            if not missing:
                tx.update_execution(action.id, baseline=baseline)
                return True
            message = (
                f"no baseline for {', '.join(missing)}, whose range is relative to it; nothing ran"
            )
            deny = [DenyReason(code="baseline_unavailable", message=message)]
            decision = _local_decision(action, deny, now)
            tx.insert_decision(decision)
            tx.update_execution(action.id, baseline=baseline, reason=message, finished_at=now)
            held.action = record_transition(
                tx, locked, S.BLOCKED_AT_EXECUTION, actor=self.worker_id, now=now,
                data={"deny": ["baseline_unavailable"], "message": message},
            )  # fmt: skip
        self._emit("blocked", action.id, message, state=S.BLOCKED_AT_EXECUTION)
        self._release(held, S.BLOCKED_AT_EXECUTION)
        return False

    def _capture_and_run(self, held: _Held) -> None:
        action, action_type = held.action, held.action_type
        if not self._measure_baseline(held):
            return
        if action_type.capture is not None:
            result = self._run_step(held, "capture", action_type.capture)
            typed: Any = None
            error = result.error
            if result.ok and result.value is not None:
                try:
                    typed = typed_capture(result.value, action_type.capture.type)
                except ValueError as exc:
                    error = str(exc)
            if not result.ok or result.value is None or error is not None:
                self._update(action.id, capture_output=result.output)
                self._end(
                    held,
                    S.FAILED,
                    outcome="runner_error",
                    reason=_one_line(f"capture failed before anything ran: {error}"),
                )
                return
            name = action_type.capture.as_ or "captured"
            held.values[name] = typed
            self._update(
                action.id,
                "execution.captured",
                captured={name: typed},
                capture_output=result.output,
            )
            failpoint("after_capture")
        execution = self.store.get_execution(action.id)
        if execution is not None and execution.rollback_requested_by is not None:
            self._end(
                held,
                S.FAILED,
                outcome="manual",
                reason=_one_line(f"rollback requested before run started: {execution.reason}"),
            )
            return
        if self._draining:  # nothing has run yet: the next worker starts it cleanly
            self._hand_over(held, f"worker {self.worker_id} is shutting down")
            return
        now = run_started_at = self.clock()
        # Stored before the step starts: from here on, `run` may have changed something.
        self._update(action.id, "execution.run_started", run_started_at=now)
        failpoint("after_run_started")
        watch: Watch | None = None
        if action.verification.stop_conditions:
            watch = Watch(
                action_id=action.id,
                phase="run",
                spec=stop_only(action.verification),
                rendered=held.rendered,
                state=VerificationState.start(now, baseline=held.baseline),
                on_done=lambda _w: held.cancel.set(),
            )
            held.watch = watch
            self.hub.watch(watch)
        result = self._run_step(held, "run", action_type.run)
        if watch is not None:
            self.hub.unwatch(watch)
        run_finished_at = self.clock()
        self._update(
            action.id,
            "execution.run_finished",
            run_finished_at=run_finished_at,
            run_exit_code=result.exit_code,
            run_output=result.output,
            run_error=result.error,
        )
        if watch is not None and watch.abort_reason is not None:
            self._abandon_or_manual(held, watch)
            return
        if watch is not None and watch.state.done:
            self._roll_back_for(held, watch.state)
            return
        if not result.ok:
            self._roll_back(
                held, outcome="runner_error", reason=_one_line(f"run failed: {result.error}")
            )
            return
        now = self.clock()
        with self.store.transaction() as tx:
            locked = tx.lock_action(action.id)
            assert locked is not None
            # The execution row before the audit head, as every other transaction does:
            # taking them the other way round deadlocks with the heartbeat.
            tx.update_execution(action.id, verify_started_at=now)
            held.action = record_transition(
                tx, locked, S.VERIFYING, actor=self.worker_id, now=now,
                data={"exit_code": result.exit_code},
            )  # fmt: skip
        self._emit("state", action.id, "verifying", state=S.VERIFYING)
        fresh = self._fresh_state(held, now, run_started_at, run_finished_at)
        self._watch(held, "verify", action.verification, now, self._after_verify, resume=fresh)

    def _scrape_interval(self) -> float:
        if self.scrape_interval is not None:
            return self.scrape_interval
        asked = self.hub.provider.scrape_interval()
        return self.fallback_scrape_interval if asked is None else asked

    def _fresh_state(
        self, held: _Held, now: datetime, step_started: datetime | None, step_finished: datetime
    ) -> VerificationState:
        """A verification that counts signal measurements only once their data postdates
        the step (`run`, or `undo` for a rollback): docs/design.md, "Post-change
        evidence"."""
        spec = held.action.verification
        queries = [held.rendered[s.name] for s in spec.signals if s.name in held.rendered]
        floor = evidence_floor(queries, self._scrape_interval())
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

    def _watch(
        self,
        held: _Held,
        phase: WatchPhase,
        spec: VerificationSpec,
        now: datetime,
        then: Callable[[_Held, Watch], None],
        resume: VerificationState | None = None,
    ) -> None:
        if self._draining:
            self._hand_over(held, f"worker {self.worker_id} is shutting down")
            return

        def hand_back(done: Watch) -> None:
            self._pool.submit(self._guarded, held, then, held, done)

        held.watch = Watch(
            action_id=held.action.id,
            phase=phase,
            spec=spec,
            rendered=held.rendered,
            state=resume or VerificationState.start(now),
            on_done=hand_back,
        )
        self.hub.watch(held.watch)

    def _after_verify(self, held: _Held, watch: Watch) -> None:
        if watch.abort_reason is not None:
            self._abandon_or_manual(held, watch)
        elif watch.state.succeeded:
            self._end(held, S.SUCCEEDED, outcome="succeeded", reason=watch.state.detail)
        else:
            self._roll_back_for(held, watch.state)

    def _abandon_or_manual(self, held: _Held, watch: Watch) -> None:
        if watch.abort_reason == "manual":
            execution = self.store.get_execution(held.action.id)
            self._roll_back(
                held,
                outcome="manual",
                reason=execution.reason if execution else "manual rollback",
                requested_by=execution.rollback_requested_by if execution else None,
            )
        elif watch.abort_reason == "shutdown":
            self._hand_over(held, f"worker {self.worker_id} is shutting down")
        else:  # another worker owns it now: touch nothing more
            log.warning("action %s: %s; letting go", held.action.id, watch.abort_reason)
            self._release(held, None)

    def _roll_back_for(self, held: _Held, state: VerificationState) -> None:
        self._roll_back(
            held,
            outcome=state.outcome or "failed_verification",
            reason=state.detail,
            trigger=(state.decided_by, state.decided_kind, state.decided_value),
        )

    def _roll_back(
        self,
        held: _Held,
        *,
        outcome: ExecutionOutcome,
        reason: str,
        trigger: tuple[str | None, str | None, float | None] = (None, None, None),
        requested_by: str | None = None,
    ) -> None:
        """Decide the rollback (irreversible actions fail loudly instead), then undo."""
        action_id = held.action.id
        now = self.clock()
        name, kind, value = trigger
        facts: dict[str, Any] = {
            "outcome": outcome,
            "reason": _one_line(reason),
            "trigger_name": name,
            "trigger_kind": kind,
            "trigger_value": value,
        }
        undo = held.action_type.undo
        with self.store.transaction() as tx:
            locked = tx.lock_action(action_id)
            assert locked is not None
            if undo is None:
                loud = (
                    f"IRREVERSIBLE: {held.action_type.name} on {locked.target} cannot be rolled "
                    f"back ({_one_line(reason)}); nothing was undone, a human must act now"
                )
                tx.update_execution(action_id, **{**facts, "reason": loud}, finished_at=now)
                held.action = record_transition(
                    tx, locked, S.FAILED, actor=self.worker_id, now=now,
                    data={**facts, "irreversible": True, "message": loud},
                )  # fmt: skip
                final: ActionState | None = S.FAILED
            else:
                loud = ""
                tx.update_execution(
                    action_id,
                    **facts,
                    rollback_decided_at=now,
                    rollback_requested_by=requested_by,
                )
                held.action = record_transition(
                    tx, locked, S.ROLLING_BACK, actor=requested_by or self.worker_id, now=now,
                    data=facts,
                )  # fmt: skip
                final = None
        if final is not None:
            self._emit("state", action_id, loud, state=final)
            self._release(held, final)
            return
        self._emit("state", action_id, f"rolling back: {_one_line(reason)}", state=S.ROLLING_BACK)
        failpoint("after_rollback_decided")
        self._undo(held)

    def _undo(self, held: _Held) -> None:
        action_id = held.action.id
        undo = held.action_type.undo
        assert undo is not None
        undo_started_at = self.clock()
        self._update(action_id, "execution.undo_started", undo_started_at=undo_started_at)
        result = self._run_step(held, "undo", undo)
        undo_finished_at = self.clock()
        self._update(
            action_id,
            "execution.undo_finished",
            undo_finished_at=undo_finished_at,
            undo_exit_code=result.exit_code,
            undo_output=result.output,
            undo_error=result.error,
        )
        if not result.ok:
            self._end(
                held,
                S.ROLLBACK_FAILED,
                outcome=None,
                reason=_one_line(f"undo failed: {result.error}; a human must act"),
            )
            return
        spec = rollback_check(held.action.verification)
        now = self.clock()
        fresh = self._fresh_state(held, now, undo_started_at, undo_finished_at)
        self._watch(held, "rollback", spec, now, self._after_rollback, resume=fresh)

    def _after_rollback(self, held: _Held, watch: Watch) -> None:
        if watch.abort_reason == "shutdown":
            self._hand_over(held, f"worker {self.worker_id} is shutting down")
        elif watch.abort_reason is not None and watch.abort_reason != "manual":
            self._release(held, None)
        elif watch.state.succeeded:
            self._end(
                held,
                S.ROLLED_BACK,
                outcome=None,
                reason=None,
                rollback_verified_at=watch.state.ended_at,
            )
        else:
            self._end(
                held,
                S.ROLLBACK_FAILED,
                outcome=None,
                reason=_one_line(f"rollback not verified: {watch.state.detail}"),
            )

    def _end(
        self,
        held: _Held,
        state: ActionState,
        *,
        outcome: ExecutionOutcome | None,
        reason: str | None,
        **fields: Any,
    ) -> None:
        """The terminal transition and the execution's last facts, in one transaction."""
        action_id = held.action.id
        now = self.clock()
        updates: dict[str, Any] = {"finished_at": now, **fields}
        if outcome is not None:
            updates["outcome"] = outcome
        data: dict[str, Any] = {"outcome": outcome} if outcome else {}
        if reason is not None:
            data["reason"] = _one_line(reason)
            if state in (S.ROLLBACK_FAILED, S.FAILED, S.SUCCEEDED):
                updates["reason"] = _one_line(reason)
        with self.store.transaction() as tx:
            locked = tx.lock_action(action_id)
            assert locked is not None
            execution = tx.update_execution(action_id, **updates)
            if execution.rollback_time is not None:
                data["rollback_time"] = execution.rollback_time
            held.action = record_transition(
                tx, locked, state, actor=self.worker_id, now=now, data=data
            )
        self._emit("state", action_id, reason or state.value, state=state)
        self._release(held, state)

    def _release(self, held: _Held, state: ActionState | None) -> None:
        held.final_state = state
        with self._lock:
            self._held.pop(held.action.id, None)
        held.finished.set()
        self._emit("finished", held.action.id, state.value if state else "released", state=state)

    # --- shutdown and recovery ------------------------------------------------------------

    def drain(self) -> None:
        """Stop taking on work: running steps finish, verifications are handed over.

        A verification is not a step: it is left where it stands (its state is stored
        every interval) and its lease released, so the next worker resumes it at once.
        """
        self._draining = True
        for watch in self.hub.watches():
            if watch.phase != "run":  # a run must finish; its watch guards it meanwhile
                self.hub.abort(watch, "shutdown")

    def _hand_over(self, held: _Held, why: str) -> None:
        now = self.clock()
        with self.store.transaction() as tx:
            execution = tx.lock_execution(held.action.id)
            if execution is not None and execution.worker_id == self.worker_id:
                tx.update_execution(held.action.id, lease_expires_at=now)
                record_event(
                    tx,
                    action_id=held.action.id,
                    kind="execution.released",
                    actor=self.worker_id,
                    now=now,
                    data={"why": why},
                )
        self._release(held, None)

    def recover_lapsed(self) -> list[str]:
        """Take over every execution whose worker stopped renewing its lease.

        Never starts `run` a second time: an action whose run may have started is
        resumed where it was (verification, rollback) or rolled back when the outcome
        of its run cannot be known.
        """
        taken: list[str] = []
        if self._draining:
            return taken
        for lapsed in self.store.lapsed_executions(self.clock()):
            with self._lock:
                if lapsed.action_id in self._held:
                    continue  # ours and still being handled: the heartbeat renews it
            held = self._take_over(lapsed.action_id)
            if held is not None:
                taken.append(lapsed.action_id)
        return taken

    def resume(self, action_id: str) -> bool:
        """Take over this one execution if its lease lapsed or was released (`opsgate run
        ID` after a Ctrl-C); False if another worker holds it or it has finished."""
        if self._draining:
            return False
        return self._take_over(action_id) is not None

    def _take_over(self, action_id: str) -> _Held | None:
        now = self.clock()
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
            if now < self._run_may_be_alive_until(action, execution):
                return None  # not yet: looked at again on the next poll
            dead = execution.worker_id
            execution = tx.update_execution(
                action_id,
                worker_id=self.worker_id,
                lease_expires_at=now + timedelta(seconds=self.lease),
                heartbeat_at=now,
                recovered_from=dead,
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
                    "run_started": execution.run_started_at is not None,
                    "run_finished": execution.run_finished_at is not None,
                },
            )
        action_type = self.gate.catalog.types.get(action.action_type)
        if action_type is None:
            # Without its definition nothing can be run or undone safely: say so.
            self._fail_unrecoverable(action, f"action type {action.action_type} is gone")
            return None
        values = step_values(action, execution.captured)
        held = _Held(
            action=action,
            action_type=action_type,
            values=values,
            secrets=secret_values(action_type, action.params),
            rendered=render_queries(action.verification, values),
            baseline=dict(execution.baseline or {}),
        )
        with self._lock:
            self._held[action_id] = held
        self._emit("claimed", action_id, f"recovered from {dead}", state=action.state)
        self._pool.submit(self._guarded, held, self._resume, held, execution, dead)
        return held

    def _run_may_be_alive_until(self, action: Action, execution: Execution) -> datetime:
        """Until when the run step of a lapsed execution may still be changing the target.

        A lapsed lease proves only that the worker stopped writing to the store, not that
        it is dead (a network partition, a stalled host), and its run step keeps going
        until its own timeout. Undo before then could be overtaken by the run it undoes.
        """
        if execution.run_started_at is None or execution.run_finished_at is not None:
            return execution.lease_expires_at
        action_type = self.gate.catalog.types.get(action.action_type)
        if action_type is None:
            return execution.lease_expires_at  # nothing can be undone anyway; say so now
        return execution.run_started_at + timedelta(
            seconds=action_type.run.timeout + RUN_RECOVERY_GRACE
        )

    def _resume(self, held: _Held, execution: Execution, dead: str) -> None:
        action = held.action
        spec = action.verification
        if action.state is S.EXECUTING and execution.run_started_at is None:
            self._capture_and_run(held)  # nothing ran yet: run it normally
        elif action.state is S.EXECUTING and execution.run_finished_at is None:
            self._roll_back(
                held,
                outcome="runner_error",
                reason=f"worker {dead} died while run was under way; its outcome is unknown",
            )
        elif action.state is S.EXECUTING:
            if execution.run_error is not None:
                self._roll_back(
                    held, outcome="runner_error", reason=f"run failed: {execution.run_error}"
                )
                return
            now = self.clock()
            with self.store.transaction() as tx:
                locked = tx.lock_action(action.id)
                assert locked is not None
                tx.update_execution(action.id, verify_started_at=now)
                held.action = record_transition(
                    tx, locked, S.VERIFYING, actor=self.worker_id, now=now,
                    data={"recovered_from": dead},
                )  # fmt: skip
            run_finished_at = execution.run_finished_at or now
            fresh = self._fresh_state(held, now, execution.run_started_at, run_finished_at)
            self._watch(held, "verify", spec, now, self._after_verify, resume=fresh)
        elif action.state is S.VERIFYING:
            now = self.clock()
            started = execution.verify_started_at or now
            fresh = self._fresh_state(
                held, started, execution.run_started_at, execution.run_finished_at or started
            )
            state = _resumed(execution.verify_state, fresh)
            self._watch(held, "verify", spec, now, self._after_verify, resume=state)
        elif action.state is S.ROLLING_BACK:
            if execution.undo_finished_at is None:
                # An undo puts back the captured prior state: running it again is safe,
                # leaving it half-done is not.
                self._undo(held)
            elif execution.undo_error is not None:
                self._end(
                    held,
                    S.ROLLBACK_FAILED,
                    outcome=None,
                    reason=f"undo failed: {execution.undo_error}; a human must act",
                )
            else:
                now = self.clock()
                undone = execution.undo_finished_at or now
                fresh = self._fresh_state(held, undone, execution.undo_started_at, undone)
                state = _resumed(execution.rollback_verify_state, fresh)
                self._watch(
                    held, "rollback", rollback_check(spec), now, self._after_rollback, resume=state
                )
        else:  # terminal already; only the execution row was left open
            self._update(action.id, finished_at=self.clock())
            self._release(held, action.state)

    def _fail_unrecoverable(self, action: Action, why: str) -> None:
        now = self.clock()
        with self.store.transaction() as tx:
            locked = tx.lock_action(action.id)
            if locked is None or locked.state.terminal:
                return
            target = S.ROLLBACK_FAILED if locked.state is S.ROLLING_BACK else S.FAILED
            tx.update_execution(action.id, reason=_one_line(why), finished_at=now)
            record_transition(
                tx, locked, target, actor=self.worker_id, now=now,
                data={"reason": why, "message": "a human must check the target"},
            )  # fmt: skip

    # --- the hub's sink: one transaction per tick ---------------------------------------

    def _store_tick(self, report: TickReport) -> None:
        measurements: list[Measurement] = [
            record.to_measurement(watch.action_id, watch.phase)
            for watch in report.watches
            for record in watch.last_records
        ]
        by_field: dict[str, dict[str, dict[str, Any]]] = {}
        # Rows in action id order, as the heartbeat locks them: no deadlock between them.
        for watch in sorted(report.watches, key=lambda w: w.action_id):
            state_field = _STATE_FIELD.get(watch.phase)
            if state_field is not None:
                by_field.setdefault(state_field, {})[watch.action_id] = watch.state.model_dump(
                    mode="json"
                )
        run_phase = sorted(w.action_id for w in report.watches if w.phase == "run")
        with self.store.transaction() as tx:
            tx.insert_measurements(measurements)
            owners: dict[str, tuple[str, str | None]] = {}
            for state_field, states in by_field.items():
                owners.update(tx.save_verification_states(state_field, states))
            if run_phase:  # few at a time: the actions whose run step is under way
                for action_id in run_phase:
                    found = tx.lock_execution(action_id)
                    if found is not None:
                        owners[action_id] = (found.worker_id, found.rollback_requested_by)
        for watch in report.watches:
            if watch.action_id not in owners:
                continue
            owner, requested_by = owners[watch.action_id]
            if owner != self.worker_id:
                watch.abort_reason = f"lease taken over by {owner}"
            elif (
                requested_by is not None
                and watch.phase in ("run", "verify")
                and not watch.state.done
            ):
                watch.abort_reason = "manual"
        phases = {watch.phase for watch in report.watches}
        if "verify" in phases:
            failpoint("verify_tick")
        if "rollback" in phases:
            failpoint("rollback_tick")
        for watch in report.watches:
            self._emit("measured", watch.action_id, watch=watch)

    # --- manual rollback ----------------------------------------------------------------

    def request_rollback(self, action_id: str, actor: Identity, reason: str) -> Action:
        """`opsgate rollback`: a running action is rolled back by its worker; a succeeded
        one is rolled back here, by this process, and verified."""
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
                    tx.update_execution(
                        action_id, rollback_requested_by=actor.id, reason=_one_line(reason)
                    )
                    record_event(
                        tx,
                        action_id=action_id,
                        kind="rollback.requested",
                        actor=actor.id,
                        now=now,
                        data={"reason": _one_line(reason)},
                    )
                return action
            if action.state is not S.SUCCEEDED or execution is None:
                raise StateConflict(
                    f"action {action_id} is {action.state.value}; only executing, verifying "
                    "or succeeded actions can be rolled back"
                )
            action_type = self.gate.catalog.types.get(action.action_type)
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
            facts = {"reason": _one_line(reason)}
            rolling = record_transition(
                tx, action, S.ROLLING_BACK, actor=actor.id, now=now, data=facts
            )
            tx.update_execution(
                action_id,
                **facts,
                worker_id=self.worker_id,
                lease_expires_at=now + timedelta(seconds=self.lease),
                heartbeat_at=now,
                finished_at=None,
                trigger_name=None,
                trigger_kind=None,
                trigger_value=None,
                rollback_decided_at=now,
                rollback_requested_by=actor.id,
            )
            captured = execution.captured
            baseline = dict(execution.baseline or {})
        held = _Held(
            action=rolling,
            action_type=action_type,
            values=step_values(rolling, captured),
            secrets=secret_values(action_type, rolling.params),
            rendered=render_queries(rolling.verification, step_values(rolling, captured)),
            baseline=baseline,
        )
        with self._lock:
            self._held[action_id] = held
        self._emit("state", action_id, f"rolling back: {reason}", state=S.ROLLING_BACK)
        self._pool.submit(self._guarded, held, self._undo, held)
        return rolling


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


def _audit_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Step facts for the audit log: times and codes, not the (long) outputs."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key.endswith("_output"):
            continue
        out[key] = value.isoformat() if isinstance(value, datetime) else value
    return out


@dataclass(frozen=True)
class _Judgement:
    """A re-check's verdict and what it saw, to hold the claim only while still true."""

    action: Action
    action_type: ActionType | None
    values: dict[str, Any]
    rendered: dict[str, str]
    deny: list[DenyReason]
    decision: Decision
    active: int | None  # running actions on the target the policy saw
    approvals: list[Approval]


def _still_true(tx: StoreTx, action: Action, judged: _Judgement) -> bool:
    if action != judged.action:  # any field, the state and required approvals included
        return False
    if judged.active is not None:
        running = tx.count_running_on_target(
            action.target, action.environment, exclude_id=action.id
        )
        if running != judged.active:
            return False
    return tx.approvals_for(action.id) == judged.approvals


def _principal_data(principal: Identity) -> dict[str, str]:
    return {"triggered_by": principal.id, "triggered_by_kind": principal.kind}


def _proposal_of(action: Action) -> Proposal:
    return Proposal(
        action=action.action_type,
        target=action.target,
        environment=action.environment,
        params=action.params,
        reason=action.reason,
        incident=action.incident,
        verification=action.verification,
        idempotency_key=action.idempotency_key,
    )


def _local_decision(action: Action, deny: list[DenyReason], now: datetime) -> Decision:
    """A deny decided by opsgate itself, before any policy could be asked."""
    return Decision(
        id=new_id(),
        action_id=action.id,
        phase="execute",
        allow=False,
        deny=tuple(deny),
        required_approvals=action.required_approvals,
        approver_roles=action.approver_roles,
        engine="opsgate",
        bundle_revision="",
        input={},
        result=None,
        decided_at=now,
    )
