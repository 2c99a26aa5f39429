"""The gate: propose, decide, approve, reject, cancel, expire. Domain logic over the store."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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
from opsgate.policies.engine import APPROVAL_RULE, DECISION_RULE, PolicyEngine, PolicyResult
from opsgate.policies.input import build_input
from opsgate.preconditions import CheckContext, PreconditionRegistry, PreconditionResult
from opsgate.proposals import ValidatedProposal, spec_hash, validate
from opsgate.store.base import DuplicateIdempotencyKey, Store, StoreTx

MAX_COMMENT_LENGTH = 2000


def utcnow() -> datetime:
    return datetime.now(UTC)


def shadow_json(result: PolicyResult) -> dict[str, Any]:
    return {
        "allow": result.allow,
        "deny": [dict(d) for d in result.deny],
        "required_approvals": result.required_approvals,
        "approver_roles": list(result.approver_roles),
        "revision": result.revision,
        "error": result.error,
    }


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
        checks = self.preconditions.evaluate(
            CheckContext(
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
        )
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
        started = time.perf_counter()
        result = self.engine.evaluate(DECISION_RULE, document)
        elapsed = (time.perf_counter() - started) * 1000
        shadow = self.shadow.evaluate(DECISION_RULE, document) if self.shadow else None
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
            existing = self._existing_for_key(key, spec.spec_hash)
            if existing is not None:
                return existing
        refusal: Refused | None = None
        try:
            with self.store.transaction() as tx:
                refusal = self._authorize_in(tx, "propose", principal, spec=spec)
                if refusal is None:
                    # Decided inside the write transaction, so the concurrency count it saw
                    # is still true when the action is stored.
                    action, decision = self._decide_and_store(tx, spec, principal.identity)
        except DuplicateIdempotencyKey:
            assert key is not None
            existing = self._existing_for_key(key, spec.spec_hash)
            if existing is None:  # the other writer rolled back; nothing to return
                raise StateConflict(f"idempotency key {key!r} is in use; retry") from None
            return existing
        if refusal is not None:
            raise refusal
        return ProposeOutcome(action, decision)

    def _decide_and_store(
        self, tx: StoreTx, spec: ValidatedProposal, proposer: Identity
    ) -> tuple[Action, Decision]:
        now = self.clock()
        key = spec.proposal.idempotency_key
        evaluation = self.evaluate(spec, proposer, now=now, tx=tx)
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
            },
        )
        return action, decision

    def _existing_for_key(self, key: str, digest: str) -> ProposeOutcome | None:
        action = self.store.find_action_by_idempotency_key(key)
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
        action_type = self.catalog.types.get(action.action_type)
        current = (
            spec_hash(
                action_type,
                action.target,
                action.environment,
                action.params,
                action.verification,
            )
            if action_type is not None
            else None
        )
        if current != action.spec_hash:
            raise StateConflict(
                f"action type {action.action_type} changed since {action.id} was proposed; "
                "propose it again"
            )

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
            evaluation = self.approval_evaluation(action, approver, now)
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

    def approval_evaluation(self, action: Action, approver: Identity, now: datetime) -> Evaluation:
        """`data.opsgate.approval` over the proposal's stored input plus the approver."""
        proposed = [d for d in self.store.decisions_for(action.id) if d.phase == "propose"]
        document = dict(proposed[0].input) if proposed else {}
        document["approver"] = {"id": approver.id, "kind": approver.kind}
        started = time.perf_counter()
        result = self.engine.evaluate(APPROVAL_RULE, document)
        elapsed = (time.perf_counter() - started) * 1000
        shadow = self.shadow.evaluate(APPROVAL_RULE, document) if self.shadow else None
        return Evaluation(result, document, [], self.engine.name, elapsed, shadow)

    def reject(self, action_id: str, actor: Actor, reason: str) -> Action:
        if not reason.strip():
            raise InvalidInput("reason", "a rejection needs a reason")
        if len(reason) > MAX_COMMENT_LENGTH:
            raise InvalidInput("reason", f"longer than {MAX_COMMENT_LENGTH} characters")
        principal = as_principal(actor)
        now = self.clock()
        with self.store.transaction() as tx:
            action = self._locked(tx, action_id)
            refusal = self._authorize_in(tx, "reject", principal, action=action, now=now)
            outcome: Action | Refused = (
                refusal
                if refusal is not None
                else self._reject_in(tx, action, principal.identity, reason, now)
            )
        # A refusal leaves the block normally, so its decision and event are committed.
        if isinstance(outcome, Refused):
            raise outcome
        return outcome

    def _reject_in(
        self, tx: StoreTx, action: Action, actor: Identity, reason: str, now: datetime
    ) -> Action | Refused:
        if action.state is not ActionState.PENDING_APPROVAL:
            raise StateConflict(
                f"action {action.id} is {action.state.value}; only pending_approval "
                "actions can be rejected"
            )
        if actor.id == action.proposer.id:
            raise Refused("you proposed this action; withdraw it with `opsgate cancel`")
        refusal = self._approval_refusal(tx, action, actor, now)
        if refusal is not None:
            return refusal
        return record_transition(
            tx,
            action,
            ActionState.REJECTED,
            actor=actor.id,
            now=now,
            data={"reason": reason},
        )

    def cancel(self, action_id: str, actor: Actor, reason: str = "") -> Action:
        """The proposer, or anyone who may approve it, withdraws a not-yet-running action."""
        principal = as_principal(actor)
        now = self.clock()
        with self.store.transaction() as tx:
            action = self._locked(tx, action_id)
            refusal = self._authorize_in(tx, "cancel", principal, action=action, now=now)
            outcome: Action | Refused = (
                refusal
                if refusal is not None
                else self._cancel_in(tx, action, principal.identity, reason, now)
            )
        if isinstance(outcome, Refused):
            raise outcome
        return outcome

    def _cancel_in(
        self, tx: StoreTx, action: Action, actor: Identity, reason: str, now: datetime
    ) -> Action | Refused:
        if action.state not in (ActionState.PENDING_APPROVAL, ActionState.APPROVED):
            raise StateConflict(
                f"action {action.id} is {action.state.value}; only pending or approved "
                "actions can be cancelled"
            )
        if actor.id != action.proposer.id:
            refusal = self._approval_refusal(tx, action, actor, now)
            if refusal is not None:
                return refusal
        return record_transition(
            tx,
            action,
            ActionState.CANCELLED,
            actor=actor.id,
            now=now,
            data={"reason": reason},
        )

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
        action = self.store.get_action(action_id)
        if action is None:
            raise NotFound(f"no action {action_id}; list them with `opsgate queue`")
        if reader is not None:
            try:
                self.authorize("read", reader, action)
            except Refused:
                raise NotFound(f"no action {action_id}; list them with `opsgate queue`") from None
        return ActionDetails(
            action,
            self.store.decisions_for(action_id),
            self.store.approvals_for(action_id),
            list(self.store.audit_events(action_id=action_id)),
            self.store.get_execution(action_id),
            self.store.measurements_for(action_id),
        )

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
        result = self.engine.evaluate(AUTHZ_RULE, document)
        elapsed = (time.perf_counter() - started) * 1000
        return Evaluation(result, document, [], self.engine.name, elapsed)

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
        principal = as_principal(actor)
        with self.store.transaction() as tx:
            refusal = self._authorize_in(tx, verb, principal, action=action)
        if refusal is not None:
            raise refusal
