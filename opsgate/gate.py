"""The gate: propose, decide, approve, reject, cancel, expire. Domain logic over the store."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from opsgate.catalog import Catalog
from opsgate.errors import InvalidInput, NotFound, Refused, StateConflict
from opsgate.lifecycle import new_id, record_event, record_transition
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

SYSTEM_ACTOR = "opsgate"
SECRET_PARAMS_KEY = "secret_params"  # noqa: S105 - a key name, not a secret
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

    def decision(self, *, action_id: str | None, phase: Any, at: datetime) -> Decision:
        return Decision(
            id=new_id(),
            action_id=action_id,
            phase=phase,
            allow=self.result.allow,
            deny=tuple(DenyReason(**d) for d in self.result.deny),
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
        return Evaluation(result, document, checks, self.engine.name, elapsed, shadow)

    def dry_run(self, document: Any, proposer: Identity) -> tuple[ValidatedProposal, Decision]:
        """`policy eval`: the decision for a proposal, nothing stored."""
        spec = validate(self.catalog, document)
        evaluation = self.evaluate(spec, proposer)
        return spec, evaluation.decision(action_id=None, phase="dry_run", at=self.clock())

    # --- proposing -------------------------------------------------------------------

    def propose(self, document: Any, proposer: Identity) -> ProposeOutcome:
        """Validate, decide, store: blocked or pending_approval, with decision and event."""
        spec = validate(self.catalog, document)
        key = spec.proposal.idempotency_key
        if key is not None:
            existing = self._existing_for_key(key, proposer, spec.spec_hash)
            if existing is not None:
                return existing
        try:
            with self.store.transaction() as tx:
                # Decided inside the write transaction, so the concurrency count it saw
                # is still true when the action is stored.
                action, decision = self._decide_and_store(tx, spec, proposer)
        except DuplicateIdempotencyKey:
            assert key is not None
            existing = self._existing_for_key(key, proposer, spec.spec_hash)
            if existing is None:  # the other writer rolled back; nothing to return
                raise StateConflict(f"idempotency key {key!r} is in use; retry") from None
            return existing
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

    def approve(self, action_id: str, approver: Identity, comment: str = "") -> ApproveOutcome:
        if len(comment) > MAX_COMMENT_LENGTH:
            raise InvalidInput("comment", f"longer than {MAX_COMMENT_LENGTH} characters")
        now = self.clock()
        refusal: Refused | StateConflict | None = None
        with self.store.transaction() as tx:
            action = self._locked(tx, action_id)
            if self._expire_if_due(tx, action, now) is not None:
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
                refusal = self._approval_refusal(tx, action, approver, now)
            if refusal is None:
                approvals = tx.approvals_for(action_id)
                if any(a.approver.id == approver.id for a in approvals):
                    return ApproveOutcome(action, approvals, counted=False)
                approval = Approval(
                    id=new_id(),
                    action_id=action_id,
                    approver=approver,
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
                    actor=approver.id,
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
                        actor=approver.id,
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

    def prove_approvals(
        self,
        tx: StoreTx,
        action: Action,
        document: Mapping[str, Any],
        required: int,
        now: datetime,
    ) -> DenyReason | None:
        """Recount, from the approval rows alone, whether this action may run now.

        The action's `approved` state is not evidence: anyone who can write the table can
        set it. An approval counts only if it is bound to this spec hash, was given by a
        human other than the proposer after the proposal, and the current approval rule
        still allows its approver for this action (`document`: today's execute input).
        The run must start within the TTL of the moment the requirement was met.
        """
        counted: dict[str, datetime] = {}
        dropped: list[str] = []
        earliest = action.created_at
        for approval in tx.approvals_for(action.id):
            who = approval.approver
            if (
                approval.action_id != action.id
                or approval.spec_hash != action.spec_hash
                or who.id == action.proposer.id
                or who.kind != "human"
                or not earliest <= approval.created_at <= now
            ):
                dropped.append(who.id)
                continue
            if who.id in counted:
                continue
            verdict = self.engine.evaluate(
                APPROVAL_RULE, {**document, "approver": {"id": who.id, "kind": who.kind}}
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

    def reject(self, action_id: str, actor: Identity, reason: str) -> Action:
        if not reason.strip():
            raise InvalidInput("reason", "a rejection needs a reason")
        if len(reason) > MAX_COMMENT_LENGTH:
            raise InvalidInput("reason", f"longer than {MAX_COMMENT_LENGTH} characters")
        now = self.clock()
        refusal: Refused | None = None
        with self.store.transaction() as tx:
            action = self._locked(tx, action_id)
            if action.state is not ActionState.PENDING_APPROVAL:
                raise StateConflict(
                    f"action {action_id} is {action.state.value}; only pending_approval "
                    "actions can be rejected"
                )
            if actor.id == action.proposer.id:
                raise Refused("you proposed this action; withdraw it with `opsgate cancel`")
            refusal = self._approval_refusal(tx, action, actor, now)
            if refusal is None:
                return record_transition(
                    tx,
                    action,
                    ActionState.REJECTED,
                    actor=actor.id,
                    now=now,
                    data={"reason": reason},
                )
        raise refusal

    def cancel(self, action_id: str, actor: Identity, reason: str = "") -> Action:
        """The proposer, or anyone who may approve it, withdraws a not-yet-running action."""
        now = self.clock()
        refusal: Refused | None = None
        with self.store.transaction() as tx:
            action = self._locked(tx, action_id)
            if action.state not in (ActionState.PENDING_APPROVAL, ActionState.APPROVED):
                raise StateConflict(
                    f"action {action_id} is {action.state.value}; only pending or approved "
                    "actions can be cancelled"
                )
            if actor.id != action.proposer.id:
                refusal = self._approval_refusal(tx, action, actor, now)
            if refusal is None:
                return record_transition(
                    tx,
                    action,
                    ActionState.CANCELLED,
                    actor=actor.id,
                    now=now,
                    data={"reason": reason},
                )
        raise refusal

    def expire_due(self) -> list[Action]:
        """Expire pending actions past their approval TTL, and approved ones not started
        within it."""
        now = self.clock()
        expired: list[Action] = []
        for candidate in self.store.due_for_expiry(now):
            with self.store.transaction() as tx:
                action = tx.lock_action(candidate.id)
                if action is not None:
                    done = self._expire_if_due(tx, action, now)
                    if done is not None:
                        expired.append(done)
        return expired

    # --- reading ---------------------------------------------------------------------

    def queue(self) -> list[Action]:
        self.expire_due()
        return self.store.list_actions(states=[ActionState.PENDING_APPROVAL], limit=1000)

    def details(self, action_id: str) -> ActionDetails:
        return action_details(self.store, action_id)


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
