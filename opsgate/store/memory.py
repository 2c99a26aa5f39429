"""The in-memory store: the Store protocol over dicts, with the SQL store's semantics
(transactions, the audit chain, the one-active-action-per-target rule). Tests, and
`memory://`, use it; the SQL store is tested against the same suite."""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from opsgate.audit import GENESIS_HASH, AuditDraft, seal
from opsgate.models import (
    ACTIVE_STATES,
    MUTABLE_EXECUTION_FIELDS,
    Action,
    ActionState,
    ApiToken,
    Approval,
    AuditCheckpoint,
    AuditEvent,
    Decision,
    Execution,
    ExecutionUpdate,
    Measurement,
    TrustReset,
    WorkerInfo,
)
from opsgate.notify.events import outbox_entry
from opsgate.shared import FAR_FUTURE
from opsgate.store.base import (
    MUTABLE_ACTION_FIELDS,
    ActionQuery,
    DuplicateIdempotencyKey,
    OutboxItem,
    StoreError,
    TargetBusy,
    refuse_immutable,
)

if TYPE_CHECKING:
    from opsgate.trust import Facts, Figures

__all__ = ["MemoryStore", "MemoryTx"]

M = TypeVar("M", bound=BaseModel)
_EXPIRABLE = frozenset({ActionState.PENDING_APPROVAL, ActionState.APPROVED})
_EXECUTION_TIMES = tuple(
    name
    for name, info in Execution.model_fields.items()
    if info.annotation in (datetime, datetime | None)
)
_WORKER_TIMES = ("started_at", "heartbeat_at", "stopped_at")


def _utc(value: datetime) -> datetime:
    """Naive means UTC, as in the SQL store, so comparisons never mix naive and aware."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# --- the in-memory store -----------------------------------------------------------------


@dataclass
class _Tables:
    actions: dict[str, Action] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    approvals: list[Approval] = field(default_factory=list)
    audit: list[AuditEvent] = field(default_factory=list)
    executions: dict[str, Execution] = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)
    workers: dict[str, WorkerInfo] = field(default_factory=dict)
    api_tokens: dict[str, ApiToken] = field(default_factory=dict)
    checkpoints: list[AuditCheckpoint] = field(default_factory=list)
    outbox: dict[str, OutboxItem] = field(default_factory=dict)
    trust_resets: list[TrustReset] = field(default_factory=list)

    def copy(self) -> _Tables:
        # Models are frozen and replaced, never changed, so copying the containers suffices.
        return _Tables(
            dict(self.actions),
            list(self.decisions),
            list(self.approvals),
            list(self.audit),
            dict(self.executions),
            list(self.measurements),
            dict(self.workers),
            dict(self.api_tokens),
            list(self.checkpoints),
            dict(self.outbox),
            list(self.trust_resets),
        )


class MemoryTx:
    """`StoreTx` over a private copy of the tables; the store adopts it on commit."""

    def __init__(self, tables: _Tables) -> None:
        self._t = tables
        self.failed = False  # like a database error: the transaction will not commit

    def _fail(self, message: str) -> StoreError:
        self.failed = True
        return StoreError(message)

    def lock_action(self, action_id: str) -> Action | None:
        return _copy(self._t.actions.get(action_id))

    def insert_action(self, action: Action) -> None:
        if action.id in self._t.actions:
            raise self._fail(f"action {action.id} already exists")
        key = action.idempotency_key
        if key is not None and any(
            a.idempotency_key == key and a.proposer.id == action.proposer.id
            for a in self._t.actions.values()
        ):
            raise DuplicateIdempotencyKey(
                f"idempotency key {key!r} is already used by another action"
            )
        self._t.actions[action.id] = _in_utc(action, "created_at", "updated_at", "expires_at")

    def update_action(self, action_id: str, **fields: Any) -> Action:
        refuse_immutable(fields, MUTABLE_ACTION_FIELDS, "an action")
        current = self._t.actions.get(action_id)
        if current is None:
            raise StoreError(f"no action {action_id}")
        # Validate like a database row would be: a bad state is refused, not stored.
        updated = _in_utc(
            Action.model_validate({**current.model_dump(), **fields}), "updated_at", "expires_at"
        )
        self._t.actions[action_id] = updated
        return updated.model_copy(deep=True)

    def insert_decision(self, decision: Decision) -> None:
        if any(d.id == decision.id for d in self._t.decisions):
            raise self._fail(f"decision {decision.id} already exists")
        if decision.action_id is not None and decision.action_id not in self._t.actions:
            raise self._fail(f"decision {decision.id} refers to a missing action")
        self._t.decisions.append(_in_utc(decision, "decided_at"))

    def insert_approval(self, approval: Approval) -> None:
        if approval.action_id not in self._t.actions:
            raise self._fail(f"approval {approval.id} refers to a missing action")
        for existing in self._t.approvals:
            if existing.id == approval.id or (
                existing.action_id == approval.action_id
                and existing.approver.id == approval.approver.id
            ):
                raise self._fail(
                    f"{approval.approver.id} has already approved action {approval.action_id}"
                )
        self._t.approvals.append(_in_utc(approval, "created_at"))

    def approvals_for(self, action_id: str) -> list[Approval]:
        return _approvals_of(self._t, action_id)

    def count_active_on_target(
        self, target: str, environment: str, *, exclude_id: str | None = None
    ) -> int:
        return _count_active(self._t, target, environment, exclude_id)

    def holders_on_target(
        self, target: str, environment: str, *, running: bool, exclude_id: str | None = None
    ) -> list[tuple[str, str]]:
        return _holders(self._t, target, environment, running, exclude_id)

    def insert_audit_checkpoint(self, checkpoint: AuditCheckpoint) -> None:
        self._t.checkpoints.append(_in_utc(checkpoint, "at"))

    def append_audit(self, draft: AuditDraft) -> AuditEvent:
        last = self._t.audit[-1] if self._t.audit else None
        event = seal(
            draft,
            seq=last.seq + 1 if last else 1,
            prev_hash=last.hash if last else GENESIS_HASH,
        )
        self._t.audit.append(_in_utc(event, "at"))
        action = self._t.actions.get(draft.action_id) if draft.action_id else None
        entry = outbox_entry(event, action)
        if entry is not None:
            entry["delivered_to"] = ()
            self._t.outbox[entry["id"]] = OutboxItem(**entry)
        return event

    def append_audit_at_commit(self, draft: AuditDraft) -> None:
        self.append_audit(draft)  # transactions here are serial: nothing to hold

    # --- execution --------------------------------------------------------------------

    def claim_next_approved(self, now: datetime) -> Action | None:
        """The oldest approved, unexpired action (transactions here are already serial)."""
        now = _utc(now)
        ready = [
            a
            for a in self._t.actions.values()
            if a.state is ActionState.APPROVED
            and (a.expires_at is None or _utc(a.expires_at) > now)
        ]
        if not ready:
            return None
        return _copy(min(ready, key=lambda a: (_utc(a.created_at), a.id)))

    def count_running_on_target(
        self, target: str, environment: str, *, exclude_id: str | None = None
    ) -> int:
        return _count_running(self._t, target, environment, exclude_id)

    def insert_execution(self, execution: Execution) -> None:
        """Record a claim; TargetBusy if another unfinished execution holds the target."""
        # The same order of checks as the SQL store: target first (the tx stays usable),
        # then the constraints that a database would refuse (the tx fails).
        if execution.finished_at is None and _count_running(
            self._t, execution.target, execution.environment, None
        ):
            raise TargetBusy(
                f"another action is executing on {execution.target} ({execution.environment})"
            )
        if execution.action_id in self._t.executions:
            raise self._fail(f"action {execution.action_id} already has an execution")
        if execution.action_id not in self._t.actions:
            raise self._fail(f"execution refers to a missing action {execution.action_id}")
        self._t.executions[execution.action_id] = _in_utc(execution, *_EXECUTION_TIMES)

    def lock_execution(self, action_id: str) -> Execution | None:
        found = self._t.executions.get(action_id)
        return found.model_copy(deep=True) if found is not None else None

    def save_verification_states(
        self, field: str, states: Mapping[str, dict[str, Any]]
    ) -> dict[str, tuple[str, str | None]]:
        """Store many verification states at once; who holds each lease, who asked for
        a rollback."""
        if field not in {"verify_state", "rollback_verify_state"}:
            raise ValueError(f"{field} is not a verification state field")
        owners: dict[str, tuple[str, str | None]] = {}
        for action_id, state in states.items():
            current = self._t.executions.get(action_id)
            if current is None:
                continue
            updated = current.model_copy(update={field: dict(state)})
            self._t.executions[action_id] = updated
            owners[action_id] = (updated.worker_id, updated.rollback_requested_by)
        return owners

    def update_execution(self, action_id: str, changes: ExecutionUpdate) -> Execution:
        """Write the fields `changes` sets to an execution and return the new row."""
        fields = changes.changes()
        refuse_immutable(fields, MUTABLE_EXECUTION_FIELDS, "an execution")
        current = self._t.executions.get(action_id)
        if current is None:
            raise StoreError(f"no execution of action {action_id}")
        try:
            merged = Execution.model_validate({**current.model_dump(), **fields})
        except ValidationError as exc:
            # The same one-line message as the SQL store's check of each field.
            error = exc.errors()[0]
            raise ValueError(
                f"invalid {error['loc'][0]} for an execution: {str(error['msg']).splitlines()[0]}"
            ) from None
        if merged.finished_at is None and _count_running(
            self._t, merged.target, merged.environment, action_id
        ):
            # Reopening a finished execution on a held target: the unique index refuses it.
            raise self._fail(
                f"another action is executing on {merged.target} ({merged.environment})"
            )
        updated = _in_utc(merged, *_EXECUTION_TIMES)
        self._t.executions[action_id] = updated
        return updated.model_copy(deep=True)

    def insert_measurements(self, measurements: Sequence[Measurement]) -> None:
        for measurement in measurements:
            if measurement.action_id not in self._t.actions:
                raise self._fail(f"measurement refers to a missing action {measurement.action_id}")
        self._t.measurements.extend(_in_utc(m, "at") for m in measurements)

    # Not in StoreTx: MemoryStore runs each of these in a transaction of its own.

    def renew_leases(
        self,
        worker_id: str,
        now: datetime,
        until: datetime,
        only: Collection[str] | None = None,
    ) -> int:
        renewed = 0
        for action_id, execution in self._t.executions.items():
            if only is not None and action_id not in only:
                continue
            if execution.worker_id == worker_id and execution.finished_at is None:
                self._t.executions[action_id] = execution.model_copy(
                    update={"lease_expires_at": _utc(until), "heartbeat_at": _utc(now)}
                )
                renewed += 1
        worker = self._t.workers.get(worker_id)
        if worker is not None:
            self._t.workers[worker_id] = worker.model_copy(update={"heartbeat_at": _utc(now)})
        return renewed

    def register_worker(self, worker: WorkerInfo) -> None:
        self._t.workers[worker.id] = _in_utc(worker, *_WORKER_TIMES)

    def stop_worker(self, worker_id: str, now: datetime) -> None:
        worker = self._t.workers.get(worker_id)
        if worker is not None:
            self._t.workers[worker_id] = worker.model_copy(update={"stopped_at": _utc(now)})

    def insert_api_token(self, token: ApiToken) -> None:
        if token.id in self._t.api_tokens:
            raise self._fail(f"api token {token.id} already exists")
        self._t.api_tokens[token.id] = _in_utc(token, "created_at", "expires_at")

    def insert_trust_reset(self, reset: TrustReset) -> None:
        self._t.trust_resets.append(reset)

    def last_trust_reset(
        self, proposer_id: str, action_type: str, before: datetime | None = None
    ) -> datetime | None:
        return _last_trust_reset(self._t, proposer_id, action_type, before)

    def track_record_facts(
        self, proposer_id: str, action_type: str, environment: str, since: datetime, until: datetime
    ) -> Facts:
        return _memory_facts(self._t, proposer_id, action_type, environment, since, until)

    def track_record_figures(
        self, proposer_id: str, action_type: str, environment: str, since: datetime
    ) -> dict[str, Figures]:
        return _memory_figures(self._t, proposer_id, action_type, environment, since)

    def revoke_api_token(self, token_id: str, at: datetime, by: str) -> ApiToken | None:
        token = self._t.api_tokens.get(token_id)
        if token is None or token.revoked_at is not None:
            return None
        revoked = token.model_copy(update={"revoked_at": _utc(at), "revoked_by": by})
        self._t.api_tokens[token_id] = revoked
        return revoked.model_copy(deep=True)


class MemoryStore:
    """`Store` in memory for unit tests: one lock per transaction, all or nothing."""

    url = "memory://"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._tables = _Tables()
        self._owner: int | None = None

    @contextmanager
    def transaction(self) -> Iterator[MemoryTx]:
        """Work on a copy of the tables; adopt it if the block ends normally."""
        with self._lock:
            if self._owner == threading.get_ident():
                raise StoreError(
                    "a transaction is already open in this thread; nesting is not allowed"
                )
            self._owner = threading.get_ident()
            try:
                work = self._tables.copy()
                tx = MemoryTx(work)
                yield tx
                if tx.failed:
                    raise StoreError(
                        "a statement in this transaction failed; nothing of it was written"
                    )
                self._tables = work
            finally:
                self._owner = None

    def migrate(self) -> None:
        """Nothing to create in memory."""

    def get_action(self, action_id: str) -> Action | None:
        with self._lock:
            return _copy(self._tables.actions.get(action_id))

    def find_action_by_idempotency_key(self, key: str, proposer_id: str) -> Action | None:
        with self._lock:
            for action in self._tables.actions.values():
                if action.idempotency_key == key and action.proposer.id == proposer_id:
                    return _copy(action)
            return None

    def list_actions(
        self,
        *,
        states: Collection[ActionState] | None = None,
        proposer_id: str | None = None,
        limit: int = 100,
    ) -> list[Action]:
        """Oldest first."""
        wanted = None if states is None else {ActionState(s) for s in states}
        with self._lock:
            found = [
                a
                for a in self._tables.actions.values()
                if (wanted is None or a.state in wanted)
                and (proposer_id is None or a.proposer.id == proposer_id)
            ]
        found.sort(key=lambda a: (_utc(a.created_at), a.id))
        return [a.model_copy(deep=True) for a in found[: max(limit, 0)]]

    def due_for_expiry(self, now: datetime) -> list[Action]:
        """Pending or approved actions whose expires_at has passed."""
        now = _utc(now)
        with self._lock:
            found = [
                a
                for a in self._tables.actions.values()
                if a.state in _EXPIRABLE and a.expires_at is not None and _utc(a.expires_at) <= now
            ]
        found.sort(key=lambda a: (_utc(a.expires_at or now), a.id))
        return [a.model_copy(deep=True) for a in found]

    def decisions_for(self, action_id: str) -> list[Decision]:
        with self._lock:
            found = [d for d in self._tables.decisions if d.action_id == action_id]
        found.sort(key=lambda d: (_utc(d.decided_at), d.id))
        return [d.model_copy(deep=True) for d in found]

    def decisions_between(
        self, since: datetime, until: datetime, phases: Collection[str]
    ) -> Iterator[Decision]:
        since, until = _utc(since), _utc(until)
        with self._lock:
            found = [
                d
                for d in self._tables.decisions
                if d.phase in phases and since <= _utc(d.decided_at) < until
            ]
        found.sort(key=lambda d: (_utc(d.decided_at), d.id))
        return iter([d.model_copy(deep=True) for d in found])

    def approvals_for(self, action_id: str) -> list[Approval]:
        with self._lock:
            return _approvals_of(self._tables, action_id)

    def count_active_on_target(
        self, target: str, environment: str, *, exclude_id: str | None = None
    ) -> int:
        with self._lock:
            return _count_active(self._tables, target, environment, exclude_id)

    def count_running_on_target(
        self, target: str, environment: str, *, exclude_id: str | None = None
    ) -> int:
        with self._lock:
            return _count_running(self._tables, target, environment, exclude_id)

    def holders_on_target(
        self, target: str, environment: str, *, running: bool, exclude_id: str | None = None
    ) -> list[tuple[str, str]]:
        with self._lock:
            return _holders(self._tables, target, environment, running, exclude_id)

    def find_actions(self, query: ActionQuery) -> list[Action]:
        """Actions matching every filter of the query, newest first, at most query.limit."""
        with self._lock:
            found = [
                a
                for a in self._tables.actions.values()
                if (not query.states or a.state in query.states)
                and (not query.environments or a.environment in query.environments)
                and (not query.action_types or a.action_type in query.action_types)
                and (not query.targets or a.target in query.targets)
                and (query.proposer_id is None or a.proposer.id == query.proposer_id)
                and (query.since is None or _utc(a.created_at) >= _utc(query.since))
            ]
        found.sort(key=lambda a: (_utc(a.created_at), a.id), reverse=True)
        return [a.model_copy(deep=True) for a in found[: max(query.limit, 0)]]

    def action_ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        with self._lock:
            ids = sorted(i for i in self._tables.actions if i.startswith(prefix))
        return ids[: max(limit, 0)]

    def neighbour_ids(self, action_id: str) -> tuple[str | None, str | None]:
        with self._lock:
            ids = list(self._tables.actions)
        before = max((i for i in ids if i < action_id), default=None)
        after = min((i for i in ids if i > action_id), default=None)
        return before, after

    def get_execution(self, action_id: str) -> Execution | None:
        with self._lock:
            found = self._tables.executions.get(action_id)
        return found.model_copy(deep=True) if found is not None else None

    def measurements_for(self, action_id: str) -> list[Measurement]:
        """In the order they were taken (stored)."""
        with self._lock:
            found = [m for m in self._tables.measurements if m.action_id == action_id]
        return [m.model_copy(deep=True) for m in found]

    def renew_leases(
        self,
        worker_id: str,
        now: datetime,
        until: datetime,
        only: Collection[str] | None = None,
    ) -> int:
        """Extend this worker's unfinished leases and its heartbeat in one transaction."""
        with self.transaction() as tx:
            return tx.renew_leases(worker_id, now, until, only)

    def register_worker(self, worker: WorkerInfo) -> None:
        """Insert or replace a worker's row."""
        with self.transaction() as tx:
            tx.register_worker(worker)

    def stop_worker(self, worker_id: str, now: datetime) -> None:
        """Mark a worker stopped; a worker that never registered is left alone."""
        with self.transaction() as tx:
            tx.stop_worker(worker_id, now)

    def list_workers(self) -> list[WorkerInfo]:
        """Newest heartbeat first."""
        with self._lock:
            found = list(self._tables.workers.values())
        # Two stable sorts: id ascending within heartbeat descending, as the SQL store.
        found.sort(key=lambda w: w.id)
        found.sort(key=lambda w: _utc(w.heartbeat_at), reverse=True)
        return [w.model_copy(deep=True) for w in found]

    def unfinished_executions(self) -> list[Execution]:
        """Every execution under way (leases held or lapsed), oldest claim first."""
        with self._lock:
            found = [e for e in self._tables.executions.values() if e.finished_at is None]
        found.sort(key=lambda e: (_utc(e.claimed_at), e.action_id))
        return [e.model_copy(deep=True) for e in found]

    def lapsed_executions(self, now: datetime) -> list[Execution]:
        """Unfinished executions whose lease expired before `now`, oldest lease first."""
        now = _utc(now)
        with self._lock:
            found = [
                e
                for e in self._tables.executions.values()
                if e.finished_at is None and _utc(e.lease_expires_at) < now
            ]
        found.sort(key=lambda e: (_utc(e.lease_expires_at), e.action_id))
        return [e.model_copy(deep=True) for e in found]

    def audit_events(self, *, action_id: str | None = None) -> Iterator[AuditEvent]:
        """In sequence order (a snapshot taken when called)."""
        with self._lock:
            events = list(self._tables.audit)
        return iter([e for e in events if action_id is None or e.action_id == action_id])

    def audit_head(self) -> tuple[int, str]:
        with self._lock:
            last = self._tables.audit[-1] if self._tables.audit else None
        return (last.seq, last.hash) if last else (0, GENESIS_HASH)

    def insert_audit_checkpoint(self, checkpoint: AuditCheckpoint) -> None:
        with self.transaction() as tx:
            tx.insert_audit_checkpoint(checkpoint)

    def audit_checkpoints(self) -> list[AuditCheckpoint]:
        with self._lock:
            found = list(self._tables.checkpoints)
        return sorted(found, key=lambda c: c.seq)

    def row_counts(self) -> dict[str, int]:
        with self._lock:
            t = self._tables
            return {
                "actions": len(t.actions),
                "decisions": len(t.decisions),
                "approvals": len(t.approvals),
                "audit_events": len(t.audit),
                "executions": len(t.executions),
                "measurements": len(t.measurements),
                "workers": len(t.workers),
                "api_tokens": len(t.api_tokens),
                "audit_checkpoints": len(t.checkpoints),
                "outbox": len(t.outbox),
                "trust_resets": len(t.trust_resets),
            }

    def session_user(self) -> str | None:
        return None

    def get_api_token(self, token_id: str) -> ApiToken | None:
        with self._lock:
            token = self._tables.api_tokens.get(token_id)
        return token.model_copy(deep=True) if token is not None else None

    def last_trust_reset(
        self, proposer_id: str, action_type: str, before: datetime | None = None
    ) -> datetime | None:
        with self._lock:
            return _last_trust_reset(self._tables, proposer_id, action_type, before)

    def track_record_facts(
        self, proposer_id: str, action_type: str, environment: str, since: datetime, until: datetime
    ) -> Facts:
        with self._lock:
            tables = self._tables
            return _memory_facts(tables, proposer_id, action_type, environment, since, until)

    def track_record_figures(
        self, proposer_id: str, action_type: str, environment: str, since: datetime
    ) -> dict[str, Figures]:
        with self._lock:
            tables = self._tables
            return _memory_figures(tables, proposer_id, action_type, environment, since)

    def list_api_tokens(self) -> list[ApiToken]:
        with self._lock:
            found = list(self._tables.api_tokens.values())
        found.sort(key=lambda t: (_utc(t.created_at), t.id))
        return [t.model_copy(deep=True) for t in found]

    def claim_outbox(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxItem]:
        with self._lock:
            due = sorted(
                (
                    item
                    for item in self._tables.outbox.values()
                    if item.delivered_at is None
                    and item.failed_at is None
                    and item.next_attempt_at <= now
                    and (item.lease_until is None or item.lease_until < now)
                ),
                key=lambda item: (item.created_at, item.id),
            )[:limit]
            claimed = [replace(i, lease_owner=owner, lease_until=lease_until) for i in due]
            for item in claimed:
                self._tables.outbox[item.id] = item
            return claimed

    def settle_outbox(
        self,
        item_id: str,
        owner: str,
        *,
        delivered_to: Sequence[str],
        delivered_at: datetime | None,
        failed_at: datetime | None,
        next_attempt_at: datetime,
        error: str | None,
    ) -> bool:
        with self._lock:
            item = self._tables.outbox.get(item_id)
            if item is None or item.lease_owner != owner:
                return False
            self._tables.outbox[item_id] = replace(
                item,
                attempts=item.attempts + 1,
                delivered_to=tuple(delivered_to),
                delivered_at=delivered_at,
                failed_at=failed_at,
                next_attempt_at=next_attempt_at,
                last_error=error[:1000] if error is not None else None,
                lease_owner=None,
                lease_until=None,
            )
            return True

    def outbox_items(self, *, action_id: str | None = None) -> list[OutboxItem]:
        with self._lock:
            found = [
                i
                for i in self._tables.outbox.values()
                if action_id is None or i.action_id == action_id
            ]
        return sorted(found, key=lambda item: (item.created_at, item.id))

    def close(self) -> None:
        """Nothing to release."""


def _last_trust_reset(
    tables: _Tables, proposer_id: str, action_type: str, before: datetime | None
) -> datetime | None:
    times = [
        r.at
        for r in tables.trust_resets
        if r.proposer_id == proposer_id
        and r.action_type == action_type
        and (before is None or r.at <= before)
    ]
    return max(times) if times else None


def _dims_of(action: Action) -> tuple[str, ...]:
    """The report segment labels of an action, as ReportQueries labels them."""
    from opsgate.reports.queries import NONE_LABEL

    incident = action.incident
    values = (
        incident.severity,
        incident.class_,
        incident.tier,
        action.environment,
        action.action_type,
        action.proposer.kind,
    )
    return tuple(v or NONE_LABEL for v in values)


def _memory_figures(
    tables: _Tables, proposer_id: str, action_type: str, environment: str, since: datetime
) -> dict[str, Figures]:
    """Everything recorded since `since`, counted from the facts (the SQL store reads its
    summary; tests/unit/test_track_summary.py holds the two together)."""
    from opsgate.trust import rollup

    facts = _memory_facts(tables, proposer_id, action_type, environment, since, FAR_FUTURE)
    return rollup(facts, action_type, environment)


def _memory_facts(
    tables: _Tables,
    proposer_id: str,
    action_type: str,
    environment: str,
    since: datetime,
    until: datetime,
) -> Facts:
    """The SQL store's track-record facts, for tests: the same definitions as the report
    queries (a parity test holds the two together)."""
    from opsgate.reports.queries import NONE_LABEL, RunHistory
    from opsgate.trust import SCOPES, Facts, in_scope

    mine = {i: a for i, a in tables.actions.items() if a.proposer.id == proposer_id}
    facts = Facts()
    runs: dict[tuple[Any, ...], int] = {}
    for action_id, e in tables.executions.items():
        action = mine.get(action_id)
        if action is None or e.run_started_at is None:
            continue
        if since <= e.run_started_at < until:
            key = (_dims_of(action), e.outcome, e.trigger_name)
            runs[key] = runs.get(key, 0) + 1
    facts.verification = [(*key, n) for key, n in runs.items()]
    totals: dict[tuple[str, ...], list[int]] = {}
    with_code: dict[tuple[tuple[str, ...], str], int] = {}
    first_code: dict[tuple[tuple[str, ...], str], int] = {}
    for d in tables.decisions:
        action = mine.get(d.action_id or "")
        if action is None or d.phase != "propose" or not since <= d.decided_at < until:
            continue
        dims = _dims_of(action)
        total = totals.setdefault(dims, [0, 0])
        total[0] += 1
        if d.allow:
            continue
        total[1] += 1
        codes = d.deny_codes
        first = (dims, codes[0] if codes else NONE_LABEL)
        first_code[first] = first_code.get(first, 0) + 1
        for code in dict.fromkeys(codes):
            with_code[(dims, code)] = with_code.get((dims, code), 0) + 1
    facts.blocks.totals = [(dims, t[0], t[1]) for dims, t in totals.items()]
    facts.blocks.with_code = [(dims, c, n) for (dims, c), n in with_code.items()]
    facts.blocks.first_code = [(dims, c, n) for (dims, c), n in first_code.items()]
    for scope in SCOPES:
        approved = rejected = automatic = failed = 0
        for action_id, action in mine.items():
            if not in_scope(_dims_of(action), scope, action_type, environment):
                continue
            if since <= action.created_at < until and action.state is not ActionState.BLOCKED:
                approved += action.approved_at is not None
                rejected += action.state is ActionState.REJECTED
            run = tables.executions.get(action_id)
            decided = run.rollback_decided_at if run is not None else None
            if run is not None and decided is not None and since <= decided < until:
                automatic += run.rollback_requested_by is None
                failed += run.finished_at is not None and run.rollback_verified_at is None
        facts.approvals[scope] = (approved, rejected)
        facts.rollbacks[scope] = (automatic, failed)
    history: dict[tuple[str, ...], list[datetime | None]] = {}
    for action_id, e in tables.executions.items():
        action = mine.get(action_id)
        if action is None or e.finished_at is None or e.finished_at >= until:
            continue
        rolled_back = e.rollback_decided_at is not None
        marks = (
            e.finished_at,
            # SQL's `outcome != 'succeeded'` is not true for a NULL outcome.
            e.finished_at
            if (e.outcome is not None and e.outcome != "succeeded") or rolled_back
            else None,
            e.finished_at if rolled_back else None,
            e.finished_at if rolled_back and e.rollback_verified_at is None else None,
        )
        latest = history.setdefault(_dims_of(action), [None] * 4)
        for i, mark in enumerate(marks):
            if mark is not None and (latest[i] is None or mark > latest[i]):  # type: ignore[operator]
                latest[i] = mark
    facts.history = [(dims, RunHistory(*marks)) for dims, marks in history.items()]
    return facts


def _in_utc(model: M, *names: str) -> M:
    """A deep copy with these datetimes in UTC, as the SQL store returns them."""
    update = {}
    for name in names:
        value = getattr(model, name)
        if value is not None:
            update[name] = _utc(value)
    return model.model_copy(update=update, deep=True)


def _copy(action: Action | None) -> Action | None:
    # Callers may mutate the dicts inside a frozen model; keep the stored one untouched.
    return action.model_copy(deep=True) if action is not None else None


def _approvals_of(tables: _Tables, action_id: str) -> list[Approval]:
    found = [a for a in tables.approvals if a.action_id == action_id]
    found.sort(key=lambda a: (_utc(a.created_at), a.id))
    return [a.model_copy(deep=True) for a in found]


def _count_active(tables: _Tables, target: str, environment: str, exclude_id: str | None) -> int:
    return sum(
        1
        for a in tables.actions.values()
        if a.target == target
        and a.environment == environment
        and a.state in ACTIVE_STATES
        and a.id != exclude_id
    )


def _count_running(tables: _Tables, target: str, environment: str, exclude_id: str | None) -> int:
    return sum(
        1
        for e in tables.executions.values()
        if e.target == target
        and e.environment == environment
        and e.finished_at is None
        and e.action_id != exclude_id
    )


def _holders(
    tables: _Tables, target: str, environment: str, running: bool, exclude_id: str | None
) -> list[tuple[str, str]]:
    if running:
        ids = {
            e.action_id
            for e in tables.executions.values()
            if e.target == target and e.environment == environment and e.finished_at is None
        }
        found = [tables.actions[i] for i in ids if i in tables.actions]
    else:
        found = [
            a
            for a in tables.actions.values()
            if a.target == target and a.environment == environment and a.state in ACTIVE_STATES
        ]
    found = [a for a in found if a.id != exclude_id]
    found.sort(key=lambda a: (_utc(a.created_at), a.id), reverse=True)
    return [(a.id, a.state.value) for a in found[:5]]
