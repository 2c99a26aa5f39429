"""The store protocol: named operations the domain calls, never raw SQL.

A state change and its audit event are written in one transaction, passed in
explicitly (`with store.transaction() as tx: ...`), so nothing is half-recorded.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # annotations only: `except StoreError` must not load pydantic models
    from opsgate.audit import AuditDraft
    from opsgate.models import (
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
    from opsgate.trust import Facts, Figures

# Fields of an action that may change after it is created.
MUTABLE_ACTION_FIELDS = frozenset(
    {"state", "updated_at", "required_approvals", "approver_roles", "expires_at", "approved_at"}
)


def refuse_immutable(fields: Collection[str], mutable: Collection[str], what: str) -> None:
    """ValueError naming every field of `what` (an action, an execution) in `fields` that
    may not change after it is created."""
    refused = sorted(set(fields) - set(mutable))
    if refused:
        raise ValueError(
            f"cannot change {', '.join(refused)} of {what}; "
            f"only {', '.join(sorted(mutable))} may change"
        )


@dataclass(frozen=True)
class ActionQuery:
    """What `opsgate list` asks for: every filter given must match (empty = any)."""

    states: frozenset[ActionState] = frozenset()
    environments: frozenset[str] = frozenset()
    action_types: frozenset[str] = frozenset()
    targets: frozenset[str] = frozenset()
    proposer_id: str | None = None
    since: datetime | None = None
    limit: int = 50


@dataclass(frozen=True)
class OutboxItem:
    """A notification waiting in (or delivered from) the outbox."""

    id: str  # the delivery id: the same on every retry, so receivers can deduplicate
    event_id: str
    kind: str
    action_id: str | None
    payload: dict[str, Any]
    created_at: datetime
    next_attempt_at: datetime
    attempts: int
    delivered_to: tuple[str, ...]
    lease_owner: str | None = None
    lease_until: datetime | None = None
    delivered_at: datetime | None = None
    failed_at: datetime | None = None
    last_error: str | None = None


class StoreError(Exception):
    """The store could not do what was asked (connection, integrity, migration)."""


class DuplicateIdempotencyKey(StoreError):
    """Another action already holds this idempotency key."""


class TargetBusy(StoreError):
    """Another unfinished execution holds this target (enforced by a unique index)."""


class StoreTx(Protocol):
    """Operations inside one transaction; all or nothing."""

    def lock_action(self, action_id: str) -> Action | None:
        """Read an action and lock it until the transaction ends (FOR UPDATE)."""

    def insert_action(self, action: Action) -> None:
        """Insert a new action; DuplicateIdempotencyKey if its key is taken."""

    def update_action(self, action_id: str, **fields: Any) -> Action:
        """Change MUTABLE_ACTION_FIELDS of a locked action and return the new row."""

    def insert_decision(self, decision: Decision) -> None: ...

    def insert_approval(self, approval: Approval) -> None: ...

    def approvals_for(self, action_id: str) -> list[Approval]: ...

    def count_active_on_target(
        self, target: str, environment: str, *, exclude_id: str | None = None
    ) -> int:
        """Actions on this target in ACTIVE_STATES (approved .. rolling_back)."""

    def holders_on_target(
        self, target: str, environment: str, *, running: bool, exclude_id: str | None = None
    ) -> list[tuple[str, str]]:
        """(id, state) of the actions that the matching count_*_on_target counts, newest
        first (at most 5): lets a concurrent_action refusal name what holds the target."""

    def insert_audit_checkpoint(self, checkpoint: AuditCheckpoint) -> None: ...

    def append_audit(self, draft: AuditDraft) -> AuditEvent:
        """Seal the draft onto the end of the chain (serialised across writers)."""

    def append_audit_at_commit(self, draft: AuditDraft) -> None:
        """As append_audit, for a caller that needs no sealed event back: the store may
        seal it, and take the chain's head, only as the transaction commits (in the
        order of the appends), so the head is held for the write and COMMIT alone."""

    # --- execution --------------------------------------------------------------------

    def claim_next_approved(self, now: datetime) -> Action | None:
        """Lock the oldest approved, unexpired action no other transaction holds
        (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: the write lock), or None."""

    def count_running_on_target(
        self, target: str, environment: str, *, exclude_id: str | None = None
    ) -> int:
        """Unfinished executions on this target: what is touching it right now."""

    def insert_execution(self, execution: Execution) -> None:
        """Record a claim; TargetBusy if another unfinished execution holds the target."""

    def lock_execution(self, action_id: str) -> Execution | None: ...

    def update_execution(self, action_id: str, changes: ExecutionUpdate) -> Execution:
        """Write the fields `changes` sets to a locked execution and return the new row."""

    def insert_measurements(self, measurements: Sequence[Measurement]) -> None: ...

    def save_verification_states(
        self, field: str, states: Mapping[str, dict[str, Any]]
    ) -> dict[str, tuple[str, str | None]]:
        """One verification interval for many actions at once: store each action's state
        in `field` (verify_state or rollback_verify_state) and return, per action, who
        holds its lease and who asked for a rollback (a worker must let go or roll back)."""

    def register_worker(self, worker: WorkerInfo) -> None:
        """Insert or replace a worker's row (with its `worker.registered` event)."""

    # --- trust ------------------------------------------------------------------------

    def insert_trust_reset(self, reset: TrustReset) -> None:
        """Record `opsgate trust reset` (its audit event goes in the same transaction)."""

    def last_trust_reset(
        self, proposer_id: str, action_type: str, before: datetime | None = None
    ) -> datetime | None:
        """When trust was last reset for this proposer and action type (by `before`)."""

    def track_record_facts(
        self, proposer_id: str, action_type: str, environment: str, since: datetime, until: datetime
    ) -> Facts:
        """The report figures of one proposer's actions in [since, until), in this
        transaction (opsgate.trust cuts them into the track record)."""

    def track_record_figures(
        self, proposer_id: str, action_type: str, environment: str, since: datetime
    ) -> dict[str, Figures]:
        """One proposer's record since `since` (a UTC midnight), cut into its scopes: what
        every decision reads (the SQL store keeps a summary for it)."""

    # --- API tokens ---------------------------------------------------------------------

    def insert_api_token(self, token: ApiToken) -> None: ...

    def revoke_api_token(self, token_id: str, at: datetime, by: str) -> ApiToken | None:
        """Revoke a token that is not yet revoked; the revoked row, or None if there is
        no such unrevoked token."""


class Store(Protocol):
    """Everything the domain needs to persist; SQLite, PostgreSQL or memory."""

    url: str

    def transaction(self) -> AbstractContextManager[StoreTx]: ...

    def migrate(self) -> None:
        """Create or upgrade the schema to the newest revision."""

    def get_action(self, action_id: str) -> Action | None: ...

    def find_action_by_idempotency_key(self, key: str, proposer_id: str) -> Action | None:
        """This proposer's action with this key (keys are scoped to their proposer)."""

    def list_actions(
        self,
        *,
        states: Collection[ActionState] | None = None,
        proposer_id: str | None = None,
        limit: int = 100,
    ) -> list[Action]:
        """Oldest first."""

    def find_actions(self, query: ActionQuery) -> list[Action]:
        """Actions matching every filter of the query, newest first, at most query.limit."""

    def action_ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        """Ids starting with `prefix` (exact, case as stored), in id order, at most limit."""

    def neighbour_ids(self, action_id: str) -> tuple[str | None, str | None]:
        """The ids just before and just after `action_id` in id order (it need not exist):
        enough to know the shortest prefix that names it alone."""

    def due_for_expiry(self, now: datetime) -> list[Action]:
        """Pending or approved actions whose expires_at has passed."""

    def decisions_for(self, action_id: str) -> list[Decision]: ...

    def decisions_between(
        self, since: datetime, until: datetime, phases: Collection[str]
    ) -> Iterator[Decision]:
        """Decisions made in [since, until) at these phases, oldest first (paged)."""

    def approvals_for(self, action_id: str) -> list[Approval]: ...

    def count_active_on_target(
        self, target: str, environment: str, *, exclude_id: str | None = None
    ) -> int: ...

    def count_running_on_target(
        self, target: str, environment: str, *, exclude_id: str | None = None
    ) -> int: ...

    def holders_on_target(
        self, target: str, environment: str, *, running: bool, exclude_id: str | None = None
    ) -> list[tuple[str, str]]: ...

    def get_execution(self, action_id: str) -> Execution | None: ...

    def measurements_for(self, action_id: str) -> list[Measurement]:
        """In the order they were taken."""

    def renew_leases(
        self,
        worker_id: str,
        now: datetime,
        until: datetime,
        only: Collection[str] | None = None,
    ) -> int:
        """Heartbeat: extend the leases of this worker's unfinished executions (of those
        in `only`, when given) and its `heartbeat_at`, in one transaction; how many
        leases were renewed."""

    def register_worker(self, worker: WorkerInfo) -> None:
        """Insert or replace a worker's row."""

    def stop_worker(self, worker_id: str, now: datetime) -> None:
        """Mark a worker stopped (clean shutdown)."""

    def list_workers(self) -> list[WorkerInfo]:
        """Newest heartbeat first."""

    def unfinished_executions(self) -> list[Execution]:
        """Every execution under way (leases held or lapsed), oldest claim first."""

    def lapsed_executions(self, now: datetime) -> list[Execution]:
        """Unfinished executions whose lease expired before `now` (their worker died)."""

    def audit_events(self, *, action_id: str | None = None) -> Iterator[AuditEvent]:
        """In sequence order."""

    def audit_head(self) -> tuple[int, str]:
        """The sequence number and hash of the newest event, as the chain's head records it."""

    def insert_audit_checkpoint(self, checkpoint: AuditCheckpoint) -> None:
        """Store a signed head (its own transaction)."""

    def audit_checkpoints(self) -> list[AuditCheckpoint]:
        """Every stored signed head, lowest seq first."""

    def row_counts(self) -> dict[str, int]:
        """Rows per table: lets tests prove that bad input left nothing behind."""

    def session_user(self) -> str | None:
        """The database's authenticated user (PostgreSQL), or None where there is none."""

    def get_api_token(self, token_id: str) -> ApiToken | None: ...

    def last_trust_reset(
        self, proposer_id: str, action_type: str, before: datetime | None = None
    ) -> datetime | None: ...

    def track_record_facts(
        self, proposer_id: str, action_type: str, environment: str, since: datetime, until: datetime
    ) -> Facts: ...

    def track_record_figures(
        self, proposer_id: str, action_type: str, environment: str, since: datetime
    ) -> dict[str, Figures]: ...

    def list_api_tokens(self) -> list[ApiToken]:
        """Oldest first."""

    # --- notification outbox (rows are added by append_audit, in its transaction) -----

    def claim_outbox(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxItem]:
        """Lease up to `limit` undelivered items that are due and not leased by a live
        owner (a lapsed lease is taken over), oldest first."""

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
        """Record a delivery attempt and release the lease; False if `owner` no longer
        holds it (it lapsed and another owner took the item)."""

    def outbox_items(self, *, action_id: str | None = None) -> list[OutboxItem]:
        """Oldest first."""

    def close(self) -> None: ...
