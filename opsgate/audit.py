"""Hash-chained, append-only audit log: sealing new events and verifying the chain."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from opsgate.models import AuditEvent

GENESIS_HASH = "sha256:" + "0" * 64


@dataclass(frozen=True)
class AuditDraft:
    """An event before the store gives it a place in the chain."""

    id: str
    at: datetime
    action_id: str | None
    kind: str
    actor: str
    from_state: str | None = None
    to_state: str | None = None
    data: dict[str, Any] | None = None


def _finite(value: Any) -> Any:
    # NaN and infinities are not JSON (PostgreSQL refuses them): store them as text.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8: the same bytes for the same content everywhere."""
    return json.dumps(
        _finite(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )


def event_hash(
    *,
    seq: int,
    id: str,
    at: datetime,
    action_id: str | None,
    kind: str,
    actor: str,
    from_state: str | None,
    to_state: str | None,
    data: dict[str, Any],
    prev_hash: str,
) -> str:
    body = {
        "seq": seq,
        "id": id,
        "at": _utc_text(at),
        "action_id": action_id,
        "kind": kind,
        "actor": actor,
        "from_state": from_state,
        "to_state": to_state,
        "data": data,
        "prev_hash": prev_hash,
    }
    return "sha256:" + hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def _utc_text(at: datetime) -> str:
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def seal(draft: AuditDraft, *, seq: int, prev_hash: str) -> AuditEvent:
    """Give a draft its sequence number and chain it to the previous event's hash."""
    unsealed = AuditEvent(
        seq=seq,
        id=draft.id,
        at=draft.at,
        action_id=draft.action_id,
        kind=draft.kind,
        actor=draft.actor,
        from_state=draft.from_state,
        to_state=draft.to_state,
        data=json.loads(canonical_json(draft.data or {})),
        prev_hash=prev_hash,
        hash="",
    )
    return unsealed.model_copy(update={"hash": content_hash(unsealed)})


def content_hash(event: AuditEvent) -> str:
    """What `event.hash` must be for the event's content and its link."""
    return event_hash(
        seq=event.seq,
        id=event.id,
        at=event.at,
        action_id=event.action_id,
        kind=event.kind,
        actor=event.actor,
        from_state=event.from_state,
        to_state=event.to_state,
        data=event.data,
        prev_hash=event.prev_hash,
    )


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    events: int
    first_bad_seq: int | None = None
    first_bad_id: str | None = None
    problem: str | None = None


def verify_chain(events: Iterable[AuditEvent], head: tuple[int, str] | None = None) -> ChainReport:
    """Walk the log in sequence order; name the first event that breaks the chain.

    A changed event fails its own hash; a deleted, inserted or reordered one breaks
    the sequence or the link to its predecessor; events cut from the end no longer
    reach the `head` the store recorded at the last append.
    """
    prev_hash = GENESIS_HASH
    expected_seq = 1
    count = 0
    for event in events:
        if head is not None and count == head[0] and prev_hash == head[1]:
            break  # verified up to the head; later events were appended after it was read
        count += 1
        problem = None
        if event.seq != expected_seq:
            problem = f"sequence gap or reorder: expected seq {expected_seq}, found {event.seq}"
        elif event.prev_hash != prev_hash:
            problem = "link broken: prev_hash does not match the previous event's hash"
        else:
            if content_hash(event) != event.hash:
                problem = "content changed: the event's hash does not match its content"
        if problem:
            return ChainReport(False, count, event.seq, event.id, problem)
        prev_hash = event.hash
        expected_seq += 1
    if head is not None and (head[0] != expected_seq - 1 or head[1] != prev_hash):
        return ChainReport(
            False,
            count,
            expected_seq,
            None,
            f"the chain ends at seq {expected_seq - 1} but its head records seq {head[0]}: "
            "events were removed from the end",
        )
    return ChainReport(True, count)
