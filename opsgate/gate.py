"""The gate: propose, decide, approve, reject, cancel, expire. Domain logic over the store."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from opsgate.auth.principal import Principal
from opsgate.authorization import AUTHZ_RULE, Actor, Verb, as_principal, authz_input
from opsgate.catalog import Catalog
from opsgate.errors import InvalidInput, NotFound, Refused, StateConflict, did_you_mean
from opsgate.lifecycle import (
    expire_due,
    expire_if_due,
    new_id,
    record_event,
    record_transition,
)
from opsgate.models import (
    Action,
    ActionState,
    Approval,
    AuditEvent,
    Decision,
    DenyReason,
    Execution,
    Identity,
    Measurement,
)
from opsgate.policies.engine import (
    APPROVAL_RULE,
    DECISION_RULE,
    PolicyEngine,
    PolicyResult,
    unavailable,
)
from opsgate.policies.input import build_input
from opsgate.preconditions import CheckContext, PreconditionRegistry, PreconditionResult
from opsgate.proposals import ValidatedProposal, proposal_of, spec_hash, step_values, validate
from opsgate.shared import utcnow
from opsgate.store.base import DuplicateIdempotencyKey, Store, StoreTx
from opsgate.trust import DEFAULT_WINDOW, without_record
from opsgate.trust import attach as attach_track_record
from opsgate.verification.promql import render_queries

SYSTEM_ACTOR = "opsgate"
OPTIMISTIC_TRIES = 3
SECRET_PARAMS_KEY = "secret_params"  # noqa: S105 - a key name, not a secret
MAX_COMMENT_LENGTH = 2000


def shadow_json(result: PolicyResult) -> dict[str, Any]:
    return {
        "allow": result.allow,
        "deny": [dict(d) for d in result.deny],
        "required_approvals": result.required_approvals,
        "approver_roles": list(result.approver_roles),
        "revision": result.revision,
        "error": result.error,
    }


class _DecisionThreads:
    """A few long-lived daemon threads that evaluate preconditions and policy, so the
    caller can stop waiting at a deadline. Long-lived, because engines keep one
    interpreter (or HTTP session) per thread; daemon, because an evaluation that never
    ends must not keep the process alive. A hung one holds its thread: the others serve
    on, and when all are held every decision is denied at its deadline."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._queue: queue.SimpleQueue[
            tuple[Callable[[], Any], dict[str, Any], threading.Event]
        ] = queue.SimpleQueue()
        self._started = 0
        self._idle = 0
        self._lock = threading.Lock()

    def run(self, work: Callable[[], Any], seconds: float) -> tuple[bool, Any]:
        box: dict[str, Any] = {}
        done = threading.Event()
        with self._lock:
            if self._idle == 0 and self._started < self._size:
                self._started += 1
                threading.Thread(target=self._serve, name="opsgate-decide", daemon=True).start()
            else:
                self._idle -= 1  # claimed by this job; its thread re-counts itself when free
            self._queue.put((work, box, done))
        if not done.wait(max(seconds, 0.0)):
            return False, None
        if "error" in box:
            raise box["error"]
        return True, box["value"]

    def _serve(self) -> None:
        while True:
            work, box, done = self._queue.get()
            try:
                box["value"] = work()
            except BaseException as exc:  # handed to the caller, who decides
                box["error"] = exc
            finally:
                done.set()
                with self._lock:
                    self._idle += 1


_DECISIONS = _DecisionThreads(size=8)


@dataclass(frozen=True)
class Evaluation:
    """A policy verdict and the input that produced it."""

    result: PolicyResult
    input: dict[str, Any]
    preconditions: list[PreconditionResult]
    engine: str
    duration_ms: float
    shadow: PolicyResult | None = None
    # (id, state) of the actions holding the target: a concurrent_action refusal names them.
    holders: tuple[tuple[str, str], ...] = ()

    def deny_reasons(self) -> tuple[DenyReason, ...]:
        reasons = tuple(DenyReason(**d) for d in self.result.deny)
        if not self.holders:
            return reasons
        held = ", ".join(f"{i} ({state})" for i, state in self.holders)
        return tuple(
            DenyReason(code=r.code, message=f"{r.message}; held by {held}")
            if r.code == "concurrent_action"
            else r
            for r in reasons
        )

    def decision(self, *, action_id: str | None, phase: Any, at: datetime) -> Decision:
        return Decision(
            id=new_id(),
            action_id=action_id,
            phase=phase,
            allow=self.result.allow,
            deny=self.deny_reasons(),
            required_approvals=self.result.required_approvals,
            approver_roles=self.result.approver_roles,
            engine=self.engine,
            bundle_revision=self.result.revision,
            input=self.input,
            result=dict(self.result.raw) if self.result.raw is not None else None,
            error=self.result.error,
            decided_at=at,
            duration_ms=self.duration_ms,
            shadow=shadow_json(self.shadow) if self.shadow is not None else None,
        )


@dataclass(frozen=True)
class ProposeOutcome:
    action: Action
    decision: Decision
    existing: bool = False


@dataclass(frozen=True)
class ApproveOutcome:
    action: Action
    approvals: list[Approval]
    counted: bool  # False when this approver had already approved


@dataclass(frozen=True)
class ActionDetails:
    action: Action
    decisions: list[Decision]
    approvals: list[Approval]
    events: list[AuditEvent]
    execution: Execution | None = None
    measurements: list[Measurement] = field(default_factory=list)


@dataclass
class Gate:
    """Everything up to the moment an action is approved and ready to run."""

    store: Store
    catalog: Catalog
    engine: PolicyEngine
    approval_ttl: float = 3600.0
    preconditions: PreconditionRegistry = field(default_factory=PreconditionRegistry)
    freeze_windows: Callable[[], list[Mapping[str, Any]]] = list
    clock: Callable[[], datetime] = utcnow
    shadow: PolicyEngine | None = None  # evaluated beside `engine`, never enforced
    # The environments the bundle knows (None: cannot tell, e.g. OPA holds the data). A
    # typo such as `prd` is invalid input, not a policy block that inflates block rates.
    environments: Callable[[], frozenset[str] | None] = lambda: None
    # How far back `proposer.track_record` looks (OPSGATE_TRACK_RECORD_WINDOW).
    track_record_window: float = DEFAULT_WINDOW

    def validate(self, document: Any) -> ValidatedProposal:
        """The proposal checked against the catalog and the bundle's environments."""
        spec = validate(self.catalog, document)
        known = self.environments()
        environment = spec.proposal.environment
        if known is not None and environment not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise InvalidInput(
                "environment",
                f"unknown environment {environment!r}{did_you_mean(environment, known)} "
                f"(the policy bundle knows: {listed})",
            )
        return spec

    # Preconditions, then the policy, must answer within this; past it the decision is a
    # deny (missing_precondition, policy_engine_unavailable), never a wait.
    decision_deadline: float = 5.0

    def _within(self, seconds: float, work: Callable[[], Any]) -> tuple[bool, Any]:
        """Run `work` on a decision thread; (False, None) if it is not done in time."""
        return _DECISIONS.run(work, seconds)

    def _warm(self, rule: str, document: Mapping[str, Any], seconds: float) -> PolicyResult | None:
        """The engine's verdict in this thread, when the engine itself promises it within
        `seconds` (the embedded engine, with a worker ready: its evaluation deadline
        kills the worker past it); None otherwise, and the decision thread is used. Two
        thread switches fewer per evaluation."""
        warm = getattr(self.engine, "evaluate_warm", None)
        bound = getattr(self.engine, "timeout", None)
        if self.shadow is not None or warm is None or not isinstance(bound, float):
            return None
        if bound > seconds:
            return None
        result: PolicyResult | None = warm(rule, document)
        return result

    def policy(
        self, rule: str, document: Mapping[str, Any], deadline: float
    ) -> tuple[PolicyResult, PolicyResult | None]:
        """The engine's (and shadow's) verdict, or `policy_engine_unavailable` past the
        deadline (a monotonic time)."""

        def ask() -> tuple[PolicyResult, PolicyResult | None]:
            result = self.engine.evaluate(rule, document)
            shadow = self.shadow.evaluate(rule, document) if self.shadow else None
            return result, shadow

        warm = self._warm(rule, document, deadline - time.monotonic())
        if warm is not None:
            return warm, None
        finished, value = self._within(deadline - time.monotonic(), ask)
        if not finished:
            return unavailable(f"no decision within {self.decision_deadline:g}s"), None
        result, shadow = value
        return result, shadow

    # --- deciding --------------------------------------------------------------------

    def evaluate(
        self,
        spec: ValidatedProposal,
        proposer: Identity,
        *,
        phase: Literal["propose", "execute"] = "propose",
        exclude_id: str | None = None,
        now: datetime | None = None,
        tx: StoreTx | None = None,
    ) -> Evaluation:
        """Gather preconditions, build the input, ask the engine. Never raises on a deny."""
        now = now or self.clock()
        proposal = spec.proposal
        reader = tx if tx is not None else self.store
        if phase == "execute":
            # At execution what matters is what is touching the target right now.
            active = reader.count_running_on_target(
                proposal.target, proposal.environment, exclude_id=exclude_id
            )
        else:
            active = reader.count_active_on_target(
                proposal.target, proposal.environment, exclude_id=exclude_id
            )
        context = CheckContext(
            action_type=spec.action_type,
            target=proposal.target,
            environment=proposal.environment,
            params=spec.params,
            now=now,
            active_on_target=active,
            freeze_windows=self.freeze_windows(),
            verification=spec.verification,
            phase=phase,
        )
        if self.preconditions.offline(context):
            # Built-in checks only: they cannot hang, so no hop to a decision thread.
            checks = self.preconditions.evaluate(context)
        else:
            answered, checks = self._within(
                self.decision_deadline, lambda: self.preconditions.evaluate(context)
            )
            if not answered:  # a hung Prometheus: decide on what is known, fail closed
                checks = self.preconditions.timed_out(context, self.decision_deadline)
        document = build_input(
            action_type=spec.action_type,
            target=proposal.target,
            environment=proposal.environment,
            params=spec.params,
            reason=proposal.reason,
            spec_hash=spec.spec_hash,
            proposer=proposer,
            incident=proposal.incident,
            verification=spec.verification,
            preconditions=checks,
            now=now,
            phase=phase,
            active_on_target=active,
        )
        unreadable = attach_track_record(
            document, reader, now=now, window_seconds=self.track_record_window
        )
        started = time.perf_counter()
        # Its own deadline: timed-out preconditions still get a decision that names them.
        result, shadow = self.policy(
            DECISION_RULE, document, time.monotonic() + self.decision_deadline
        )
        if unreadable is not None:
            result = without_record(result, unreadable)
        elapsed = (time.perf_counter() - started) * 1000
        holders: tuple[tuple[str, str], ...] = ()
        if active and "concurrent_action" in {d.get("code") for d in result.deny}:
            holders = tuple(
                reader.holders_on_target(
                    proposal.target,
                    proposal.environment,
                    running=phase == "execute",
                    exclude_id=exclude_id,
                )
            )
        return Evaluation(result, document, checks, self.engine.name, elapsed, shadow, holders)

    def dry_run(self, document: Any, proposer: Identity) -> tuple[ValidatedProposal, Decision]:
        """`policy eval`: the decision for a proposal, nothing stored."""
        spec = self.validate(document)
        evaluation = self.evaluate(spec, proposer)
        return spec, evaluation.decision(action_id=None, phase="dry_run", at=self.clock())

    # --- proposing -------------------------------------------------------------------

    def propose(self, document: Any, proposer: Actor) -> ProposeOutcome:
        """Validate, authorize, decide, store: blocked or pending_approval, with decision
        and event."""
        principal = as_principal(proposer)
        spec = self.validate(document)
        key = spec.proposal.idempotency_key
        if key is not None:
            existing = self._existing_for_key(key, principal.identity, spec.spec_hash)
            if existing is not None:
                return existing
        refusal: Refused | None = None
        try:
            refusal = self._authorize_outside("propose", principal, spec=spec)
            if refusal is None:
                # Decided with no transaction open, stored only if the concurrency count it
                # saw still holds (see _decide_then_store).
                action, decision = self._decide_then_store(spec, principal.identity)
        except DuplicateIdempotencyKey:
            assert key is not None
            existing = self._existing_for_key(key, principal.identity, spec.spec_hash)
            if existing is None:  # the other writer rolled back; nothing to return
                raise StateConflict(f"idempotency key {key!r} is in use; retry") from None
            return existing
        if refusal is not None:
            raise refusal
        return ProposeOutcome(action, decision)

    def _decide_then_store(
        self, spec: ValidatedProposal, proposer: Identity
    ) -> tuple[Action, Decision]:
        """Decide with no transaction open (a slow policy or Prometheus must not hold the
        store's write lock), then store only if the concurrency count the decision saw
        is still true; else decide again. After a few tries, decide under the lock."""
        proposal = spec.proposal
        for _ in range(OPTIMISTIC_TRIES):
            now = self.clock()
            evaluation = self.evaluate(spec, proposer, now=now)
            seen = evaluation.input.get("context", {}).get("active_on_target")
            with self.store.transaction() as tx:
                active = tx.count_active_on_target(proposal.target, proposal.environment)
                if active == seen:
                    return self._store_decided(tx, spec, proposer, evaluation, now)
        with self.store.transaction() as tx:
            now = self.clock()
            evaluation = self.evaluate(spec, proposer, now=now, tx=tx)
            return self._store_decided(tx, spec, proposer, evaluation, now)

    def _store_decided(
        self,
        tx: StoreTx,
        spec: ValidatedProposal,
        proposer: Identity,
        evaluation: Evaluation,
        now: datetime,
    ) -> tuple[Action, Decision]:
        key = spec.proposal.idempotency_key
        action_id = new_id()
        decision = evaluation.decision(action_id=action_id, phase="propose", at=now)
        state = ActionState.PENDING_APPROVAL if decision.allow else ActionState.BLOCKED
        proposal = spec.proposal
        action = Action(
            id=action_id,
            action_type=spec.action_type.name,
            target=proposal.target,
            environment=proposal.environment,
            params=spec.params,
            reason=proposal.reason,
            incident=proposal.incident,
            verification=spec.verification,
            risk=spec.action_type.risk,
            reversible=spec.action_type.reversible,
            spec_hash=spec.spec_hash,
            proposer=proposer,
            state=state,
            required_approvals=decision.required_approvals,
            approver_roles=decision.approver_roles,
            idempotency_key=key,
            created_at=now,
            updated_at=now,
            expires_at=now + timedelta(seconds=self.approval_ttl) if decision.allow else None,
        )
        tx.insert_action(action)
        tx.insert_decision(decision)
        record_event(
            tx,
            action_id=action_id,
            kind=f"action.{state.value}",
            actor=proposer.id,
            now=now,
            from_state=ActionState.PROPOSED.value,
            to_state=state.value,
            data={
                "deny": decision.deny_codes,
                "bundle_revision": decision.bundle_revision,
                "spec_hash": spec.spec_hash,
                "proposer_kind": proposer.kind,
                # Which params are secret, as the type said when proposed: masking must
                # not depend on today's catalog (an edited or broken file).
                SECRET_PARAMS_KEY: sorted(
                    name for name, p in spec.action_type.params.items() if p.secret
                ),
            },
        )
        return action, decision

    def _existing_for_key(self, key: str, proposer: Identity, digest: str) -> ProposeOutcome | None:
        action = self.store.find_action_by_idempotency_key(key, proposer.id)
        if action is None:
            return None
        if action.spec_hash != digest:
            raise StateConflict(
                f"idempotency key {key!r} belongs to action {action.id} with a different spec"
            )
        decisions = [d for d in self.store.decisions_for(action.id) if d.phase == "propose"]
        return ProposeOutcome(action, decisions[0], existing=True)

    # --- approving -------------------------------------------------------------------

    def _locked(self, tx: StoreTx, action_id: str) -> Action:
        action = tx.lock_action(action_id)
        if action is None:
            raise NotFound(f"no action {action_id}; list them with `opsgate queue`")
        return action

    def _expire_if_due(self, tx: StoreTx, action: Action, now: datetime) -> Action | None:
        return expire_if_due(tx, action, now)

    def approve(self, action_id: str, approver: Actor, comment: str = "") -> ApproveOutcome:
        if len(comment) > MAX_COMMENT_LENGTH:
            raise InvalidInput("comment", f"longer than {MAX_COMMENT_LENGTH} characters")
        principal = as_principal(approver)
        identity = principal.identity
        now = self.clock()
        refusal: Refused | StateConflict | None = None
        with self.store.transaction() as tx:
            action = self._locked(tx, action_id)
            refusal = self._authorize_in(tx, "approve", principal, action=action, now=now)
            if refusal is not None:
                pass
            elif self._expire_if_due(tx, action, now) is not None:
                refusal = StateConflict(
                    f"action {action_id} expired at {action.expires_at}; propose it again"
                )
            elif action.state is not ActionState.PENDING_APPROVAL:
                raise StateConflict(
                    f"action {action_id} is {action.state.value}; only pending_approval "
                    "actions can be approved"
                )
            else:
                self._check_spec_unchanged(action)
                refusal = self._approval_refusal(tx, action, identity, now)
            if refusal is None:
                approvals = tx.approvals_for(action_id)
                if any(a.approver.id == identity.id for a in approvals):
                    return ApproveOutcome(action, approvals, counted=False)
                approval = Approval(
                    id=new_id(),
                    action_id=action_id,
                    approver=identity,
                    spec_hash=action.spec_hash,
                    comment=comment,
                    created_at=now,
                )
                tx.insert_approval(approval)
                approvals.append(approval)
                valid = {a.approver.id for a in approvals if a.spec_hash == action.spec_hash}
                record_event(
                    tx,
                    action_id=action_id,
                    kind="approval.added",
                    actor=identity.id,
                    now=now,
                    data={
                        "comment": comment,
                        "spec_hash": action.spec_hash,
                        "count": len(valid),
                        "required": action.required_approvals,
                    },
                )
                if len(valid) >= action.required_approvals:
                    action = record_transition(
                        tx,
                        action,
                        ActionState.APPROVED,
                        actor=identity.id,
                        now=now,
                        data={"approvers": sorted(valid), "spec_hash": action.spec_hash},
                        # The approval is good for one run that starts within the TTL.
                        expires_at=now + timedelta(seconds=self.approval_ttl),
                        approved_at=now,
                    )
                return ApproveOutcome(action, approvals, counted=True)
        raise refusal

    def _check_spec_unchanged(self, action: Action) -> None:
        """An approval authorizes the spec that was proposed, under today's catalog."""
        if not spec_unchanged(self.catalog, action):
            raise StateConflict(
                f"action type {action.action_type} changed since {action.id} was proposed; "
                "propose it again"
            )

    def recheck(
        self,
        tx: StoreTx | None,
        action: Action,
        now: datetime,
        *,
        catalog: Catalog | None = None,
        approvals: Sequence[Approval] | None = None,
    ) -> Decision:
        """The execute decision: spec unchanged under today's `catalog` (the gate's own
        when None), queries renderable, the policy, and the approvals recounted.

        `tx` None reads outside any transaction (the claim judges first, then holds the
        claim only while what was judged is unchanged). `approvals`: the rows to recount,
        as the caller read them; read here when None. Every deny is in the decision.
        """
        catalog = catalog if catalog is not None else self.catalog
        reader = tx if tx is not None else self.store
        if approvals is None:
            approvals = reader.approvals_for(action.id)
        action_type = catalog.types.get(action.action_type)
        if action_type is None or not spec_unchanged(catalog, action):
            changed = DenyReason(
                code="spec_changed",
                message=f"action type {action.action_type} changed since approval; "
                "propose it again",
            )
            return local_decision(action, [changed], now)
        deny: list[DenyReason] = []
        try:
            render_queries(action.verification, step_values(action, {}))
        except ValueError as exc:
            deny.append(DenyReason(code="verification_undefined", message=str(exc)))
        spec = ValidatedProposal(
            proposal=proposal_of(action),
            action_type=action_type,
            params=dict(action.params),
            verification=action.verification,
            spec_hash=action.spec_hash,
        )
        evaluation = self.evaluate(
            spec, action.proposer, phase="execute", exclude_id=action.id, now=now, tx=tx
        )
        decision = evaluation.decision(action_id=action.id, phase="execute", at=now)
        if not decision.allow and not decision.deny:  # a deny always says why
            deny.append(DenyReason(code="policy_engine_unavailable"))
        # From the approval rows alone; the claim holds them only if they are unchanged.
        attested = {
            (event.actor, str(event.data.get("spec_hash")))
            for event in self.store.audit_events(action_id=action.id)
            if event.kind == "approval.added"
        }
        missing = self.prove_approvals(
            approvals, action, evaluation.input, decision.required_approvals, now, attested
        )
        if missing is not None:
            deny.append(missing)
        if not deny:
            return decision
        # Stored with the execute decision, so `run` and `show` name them.
        return decision.model_copy(update={"allow": False, "deny": (*decision.deny, *deny)})

    def _approval_refusal(
        self, tx: StoreTx, action: Action, approver: Identity, now: datetime
    ) -> Refused | None:
        """Hard rules first, then the policy's approval rule; a refusal is recorded."""
        codes: list[str]
        if approver.id == action.proposer.id:
            codes, message = (
                ["self_approval"],
                "you proposed this action; someone else must approve it",
            )
        elif approver.kind != "human":
            codes, message = ["insufficient_permissions"], "agents may propose but never approve"
        else:
            evaluation = self.approval_evaluation(action, approver, now, tx)
            tx.insert_decision(evaluation.decision(action_id=action.id, phase="approval", at=now))
            if evaluation.result.allow:
                return None
            codes = evaluation.result.deny_codes
            message = "; ".join(d["message"] or d["code"] for d in evaluation.result.deny)
        record_event(
            tx,
            action_id=action.id,
            kind="approval.refused",
            actor=approver.id,
            now=now,
            data={"deny": codes},
        )
        return Refused(f"approval refused: {message}", codes)

    def approval_evaluation(
        self, action: Action, approver: Identity, now: datetime, tx: StoreTx | None = None
    ) -> Evaluation:
        """`data.opsgate.approval` over the proposal's stored input plus the approver."""
        proposed = [d for d in self.store.decisions_for(action.id) if d.phase == "propose"]
        document = dict(proposed[0].input) if proposed else {}
        document["approver"] = {"id": approver.id, "kind": approver.kind}
        # Today's record, not the one the proposal saw (a copy: the stored input stays).
        document["proposer"] = dict(document.get("proposer") or {})
        unreadable = attach_track_record(
            document,
            tx if tx is not None else self.store,
            now=now,
            window_seconds=self.track_record_window,
        )
        started = time.perf_counter()
        result, shadow = self.policy(
            APPROVAL_RULE, document, time.monotonic() + self.decision_deadline
        )
        if unreadable is not None:
            result = without_record(result, unreadable)
        elapsed = (time.perf_counter() - started) * 1000
        return Evaluation(result, document, [], self.engine.name, elapsed, shadow)

    def prove_approvals(
        self,
        approvals: Sequence[Approval],
        action: Action,
        document: Mapping[str, Any],
        required: int,
        now: datetime,
        attested: Collection[tuple[str, str]] | None = None,
    ) -> DenyReason | None:
        """Recount, from the approval rows alone, whether this action may run now.

        The action's `approved` state is not evidence: anyone who can write the table can
        set it. An approval counts only if it is bound to this spec hash, was given by a
        human other than the proposer after the proposal, and the current approval rule
        still allows its approver for this action (`document`: today's execute input).
        The run must start within the TTL of the moment the requirement was met.
        `attested`: (approver, spec hash) of the `approval.added` events in the audit
        chain; when given, an approval row without its event does not count (a row
        inserted behind opsgate's back).
        """
        counted: dict[str, datetime] = {}
        dropped: list[str] = []
        earliest = action.created_at
        deadline = time.monotonic() + self.decision_deadline
        for approval in approvals:
            who = approval.approver
            if (
                approval.action_id != action.id
                or approval.spec_hash != action.spec_hash
                or who.id == action.proposer.id
                or who.kind != "human"
                or not earliest <= approval.created_at <= now
                or (attested is not None and (who.id, approval.spec_hash) not in attested)
            ):
                dropped.append(who.id)
                continue
            if who.id in counted:
                continue
            verdict, _ = self.policy(
                APPROVAL_RULE, {**document, "approver": {"id": who.id, "kind": who.kind}}, deadline
            )
            if verdict.allow:
                counted[who.id] = approval.created_at
            else:
                dropped.append(who.id)
        required = max(required, action.required_approvals, 1)
        times = sorted(counted.values())
        if len(times) < required:
            extra = f" (not counted: {', '.join(sorted(set(dropped)))})" if dropped else ""
            return DenyReason(
                code="approval_missing",
                message=f"valid approvals: {len(times)} of {required} required{extra}",
            )
        met_at = times[required - 1]
        if now >= met_at + timedelta(seconds=self.approval_ttl):
            return DenyReason(
                code="approval_missing",
                message=f"the approvals expired at "
                f"{(met_at + timedelta(seconds=self.approval_ttl)).isoformat()}",
            )
        return None

    def reject(self, action_id: str, actor: Actor, reason: str) -> Action:
        if not reason.strip():
            raise InvalidInput("reason", "a rejection needs a reason")
        if len(reason) > MAX_COMMENT_LENGTH:
            raise InvalidInput("reason", f"longer than {MAX_COMMENT_LENGTH} characters")
        return self._withdraw(
            "reject", action_id, actor, reason, ActionState.REJECTED, self._reject_refusal
        )

    def _reject_refusal(
        self, tx: StoreTx, action: Action, actor: Identity, now: datetime
    ) -> Refused | None:
        if action.state is not ActionState.PENDING_APPROVAL:
            raise StateConflict(
                f"action {action.id} is {action.state.value}; only pending_approval "
                "actions can be rejected"
            )
        if actor.id == action.proposer.id:
            raise Refused("you proposed this action; withdraw it with `opsgate cancel`")
        return self._approval_refusal(tx, action, actor, now)

    def cancel(self, action_id: str, actor: Actor, reason: str = "") -> Action:
        """The proposer, or anyone who may approve it, withdraws a not-yet-running action."""
        return self._withdraw(
            "cancel", action_id, actor, reason, ActionState.CANCELLED, self._cancel_refusal
        )

    def _cancel_refusal(
        self, tx: StoreTx, action: Action, actor: Identity, now: datetime
    ) -> Refused | None:
        if action.state not in (ActionState.PENDING_APPROVAL, ActionState.APPROVED):
            raise StateConflict(
                f"action {action.id} is {action.state.value}; only pending or approved "
                "actions can be cancelled"
            )
        if actor.id == action.proposer.id:
            return None
        return self._approval_refusal(tx, action, actor, now)

    def _withdraw(
        self,
        verb: Verb,
        action_id: str,
        actor: Actor,
        reason: str,
        to_state: ActionState,
        refusal_in: Callable[[StoreTx, Action, Identity, datetime], Refused | None],
    ) -> Action:
        """End a not-yet-running action: lock it, authorize `verb`, ask `refusal_in` (which
        raises StateConflict for an action past that point) and record the move with its
        audit event, all in one transaction."""
        principal = as_principal(actor)
        now = self.clock()
        with self.store.transaction() as tx:
            action = self._locked(tx, action_id)
            refusal = self._authorize_in(tx, verb, principal, action=action, now=now)
            if refusal is None:
                refusal = refusal_in(tx, action, principal.identity, now)
            if refusal is None:
                return record_transition(
                    tx,
                    action,
                    to_state,
                    actor=principal.identity.id,
                    now=now,
                    data={"reason": reason},
                )
        # A refusal leaves the block normally, so its decision and event are committed.
        raise refusal

    def expire_due(self) -> list[Action]:
        """Expire pending actions past their approval TTL, and approved ones not started
        within it."""
        return expire_due(self.store, self.clock())

    # --- reading ---------------------------------------------------------------------

    def queue(self, reader: Actor | None = None) -> list[Action]:
        """Pending actions; with a reader, only those policy lets it read."""
        self.expire_due()
        pending = self.store.list_actions(states=[ActionState.PENDING_APPROVAL], limit=1000)
        if reader is None:
            return pending
        principal = as_principal(reader)
        return [a for a in pending if self.authz(principal, "read", action=a).result.allow]

    def details(self, action_id: str, reader: Actor | None = None) -> ActionDetails:
        """Everything about one action; a reader policy refuses gets NotFound, as if the
        action did not exist, and the refusal is recorded."""
        details = action_details(self.store, action_id)
        if reader is not None:
            try:
                self.authorize("read", reader, details.action)
            except Refused:
                raise NotFound(f"no action {action_id}; list them with `opsgate queue`") from None
        return details

    # --- authorization ---------------------------------------------------------------

    def authz(
        self,
        principal: Principal,
        verb: Verb,
        *,
        action: Action | None = None,
        spec: ValidatedProposal | None = None,
        now: datetime | None = None,
    ) -> Evaluation:
        """`data.opsgate.authz`: may this principal perform this verb at all?"""
        document = authz_input(verb, principal, now or self.clock(), action=action, spec=spec)
        started = time.perf_counter()
        warm = self._warm(AUTHZ_RULE, document, self.decision_deadline)
        if warm is not None:
            result = warm
        else:
            finished, value = self._within(
                self.decision_deadline, lambda: self.engine.evaluate(AUTHZ_RULE, document)
            )
            result = (
                value
                if finished
                else unavailable(f"no decision within {self.decision_deadline:g}s")
            )
        elapsed = (time.perf_counter() - started) * 1000
        return Evaluation(result, document, [], self.engine.name, elapsed)

    def _authorize_outside(
        self,
        verb: Verb,
        principal: Principal,
        *,
        action: Action | None = None,
        spec: ValidatedProposal | None = None,
    ) -> Refused | None:
        """Ask authz with no transaction open (the policy must not hold the write lock);
        a refusal is stored in a transaction of its own and returned."""
        now = self.clock()
        evaluation = self.authz(principal, verb, action=action, spec=spec, now=now)
        if evaluation.result.allow:
            return None
        with self.store.transaction() as tx:
            return self._record_refusal(tx, verb, principal, evaluation, action, now)

    def _authorize_in(
        self,
        tx: StoreTx,
        verb: Verb,
        principal: Principal,
        *,
        action: Action | None = None,
        spec: ValidatedProposal | None = None,
        now: datetime | None = None,
    ) -> Refused | None:
        """Ask authz; a refusal is stored (decision + audit event) in `tx` and returned."""
        now = now or self.clock()
        evaluation = self.authz(principal, verb, action=action, spec=spec, now=now)
        if evaluation.result.allow:
            return None
        return self._record_refusal(tx, verb, principal, evaluation, action, now)

    def _record_refusal(
        self,
        tx: StoreTx,
        verb: Verb,
        principal: Principal,
        evaluation: Evaluation,
        action: Action | None,
        now: datetime,
    ) -> Refused:
        action_id = action.id if action is not None else None
        decision = evaluation.decision(action_id=action_id, phase="authz", at=now)
        tx.insert_decision(decision)
        record_event(
            tx,
            action_id=action_id,
            kind="authz.refused",
            actor=principal.id,
            now=now,
            data={
                "verb": verb,
                "deny": decision.deny_codes,
                "principal_kind": principal.kind,
                "method": principal.method,
                "decision_id": decision.id,
            },
        )
        message = "; ".join(d["message"] or d["code"] for d in evaluation.result.deny)
        codes = list(dict.fromkeys(evaluation.result.deny_codes))  # each code once, in order
        return Refused(f"{verb} refused: {message}", codes)

    def authorize(self, verb: Verb, actor: Actor, action: Action | None = None) -> None:
        """Authorize a verb that is carried out elsewhere (run, rollback, read); a refusal
        is stored and raised as Refused."""
        refusal = self._authorize_outside(verb, as_principal(actor), action=action)
        if refusal is not None:
            raise refusal


def spec_unchanged(catalog: Catalog, action: Action) -> bool:
    """Whether the action's spec hash is still what `catalog` makes of it."""
    action_type = catalog.types.get(action.action_type)
    if action_type is None:
        return False
    current = spec_hash(
        action_type, action.target, action.environment, action.params, action.verification
    )
    return current == action.spec_hash


def local_decision(action: Action, deny: Sequence[DenyReason], now: datetime) -> Decision:
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


def action_details(store: Store, action_id: str) -> ActionDetails:
    """Everything stored about one action; needs neither catalog nor policy engine, so
    history stays readable when either is broken."""
    action = store.get_action(action_id)
    if action is None:
        raise NotFound(f"no action {action_id}; list them with `opsgate queue`")
    return ActionDetails(
        action,
        store.decisions_for(action_id),
        store.approvals_for(action_id),
        list(store.audit_events(action_id=action_id)),
        store.get_execution(action_id),
        store.measurements_for(action_id),
    )
