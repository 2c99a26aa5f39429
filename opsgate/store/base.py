"""The store protocol: named operations the domain calls, never raw SQL.

A state change and its audit event are written in one transaction, passed in
explicitly (`with store.transaction() as tx: ...`), so nothing is half-recorded.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Protocol

from opsgate.audit import AuditDraft
from opsgate.models import Action, ActionState, Approval, AuditEvent, Decision

# Fields of an action that may change after it is created.
MUTABLE_ACTION_FIELDS = frozenset(
    {"state", "updated_at", "required_approvals", "approver_roles", "expires_at"}
)


class StoreError(Exception):
    """The store could not do what was asked (connection, integrity, migration)."""


class DuplicateIdempotencyKey(StoreError):
    """Another action already holds this idempotency key."""


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

    def append_audit(self, draft: AuditDraft) -> AuditEvent:
        """Seal the draft onto the end of the chain (serialised across writers)."""


class Store(Protocol):
    """Everything the domain needs to persist; SQLite, PostgreSQL or memory."""

    url: str

    def transaction(self) -> AbstractContextManager[StoreTx]: ...

    def migrate(self) -> None:
        """Create or upgrade the schema to the newest revision."""

    def get_action(self, action_id: str) -> Action | None: ...

    def find_action_by_idempotency_key(self, key: str) -> Action | None: ...

    def list_actions(
        self,
        *,
        states: Collection[ActionState] | None = None,
        proposer_id: str | None = None,
        limit: int = 100,
    ) -> list[Action]:
        """Oldest first."""

    def due_for_expiry(self, now: datetime) -> list[Action]:
        """Pending or approved actions whose expires_at has passed."""

    def decisions_for(self, action_id: str) -> list[Decision]: ...

    def approvals_for(self, action_id: str) -> list[Approval]: ...

    def count_active_on_target(
        self, target: str, environment: str, *, exclude_id: str | None = None
    ) -> int: ...

    def audit_events(self, *, action_id: str | None = None) -> Iterator[AuditEvent]:
        """In sequence order."""

    def audit_head(self) -> tuple[int, str]:
        """The sequence number and hash of the newest event, as the chain's head records it."""

    def row_counts(self) -> dict[str, int]:
        """Rows per table: lets tests prove that bad input left nothing behind."""

    def session_user(self) -> str | None:
        """The database's authenticated user (PostgreSQL), or None where there is none."""

    def close(self) -> None: ...
