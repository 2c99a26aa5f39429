"""verify_chain names the first bad event: changed, deleted, inserted or reordered."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import text

from opsgate.audit import GENESIS_HASH, AuditDraft, seal, verify_chain
from opsgate.models import AuditEvent
from opsgate.store.sql import SqlStore
from opsgate.testing import make_action, make_draft

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def build_chain(n: int) -> list[AuditEvent]:
    events: list[AuditEvent] = []
    prev = GENESIS_HASH
    for i in range(n):
        draft = make_draft(f"a{i % 2}", at=T0 + timedelta(seconds=i), data={"i": i})
        event = seal(draft, seq=i + 1, prev_hash=prev)
        events.append(event)
        prev = event.hash
    return events


# --- chains built in memory --------------------------------------------------------------


def test_an_intact_chain_verifies() -> None:
    report = verify_chain(build_chain(6))
    assert report.ok and report.events == 6 and report.first_bad_seq is None
    assert verify_chain([]).ok


def test_a_changed_event_fails_its_own_hash() -> None:
    events = build_chain(6)
    events[3] = events[3].model_copy(update={"actor": "mallory"})
    report = verify_chain(events)
    assert not report.ok
    assert report.first_bad_seq == 4 and report.first_bad_id == events[3].id
    assert report.problem is not None and "content changed" in report.problem


def test_a_changed_and_rehashed_event_breaks_the_next_link() -> None:
    events = build_chain(6)
    forged = seal(
        AuditDraft(**{**_draft_fields(events[2]), "data": {"i": 99}}),
        seq=3,
        prev_hash=events[2].prev_hash,
    )
    events[2] = forged
    report = verify_chain(events)
    assert report.first_bad_seq == 4
    assert report.problem is not None and "link broken" in report.problem


def test_a_deleted_event_is_a_gap() -> None:
    events = build_chain(6)
    del events[2]
    report = verify_chain(events)
    assert report.first_bad_seq == 4
    assert report.problem is not None and "expected seq 3" in report.problem


def test_an_inserted_event_is_caught() -> None:
    events = build_chain(6)
    # A forger links a new event to event 2 and gives it seq 3; the real seq 3 follows.
    forged = seal(make_draft("a0", at=T0), seq=3, prev_hash=events[1].hash)
    events.insert(2, forged)
    report = verify_chain(events)
    assert not report.ok
    assert report.first_bad_seq == 3 and report.first_bad_id == events[3].id


def test_a_reordered_pair_is_caught() -> None:
    events = build_chain(6)
    events[1], events[2] = events[2], events[1]
    report = verify_chain(events)
    assert report.first_bad_seq == 3
    assert report.problem is not None and "expected seq 2" in report.problem


@given(
    n=st.integers(min_value=1, max_value=12),
    data=st.data(),
    field=st.sampled_from(["id", "action_id", "kind", "actor", "from_state", "to_state"]),
)
def test_any_single_field_change_is_named(n: int, data: st.DataObject, field: str) -> None:
    events = build_chain(n)
    k = data.draw(st.integers(min_value=0, max_value=n - 1))
    events[k] = events[k].model_copy(update={field: "tampered"})
    report = verify_chain(events)
    assert not report.ok and report.first_bad_seq == k + 1


def _draft_fields(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "at": event.at,
        "action_id": event.action_id,
        "kind": event.kind,
        "actor": event.actor,
        "from_state": event.from_state,
        "to_state": event.to_state,
        "data": event.data,
    }


# --- real rows in an SQLite store, tampered with raw SQL -----------------------------------


@pytest.fixture
def logged(sqlite_url: str) -> Iterator[SqlStore]:
    """An SQLite store holding six chained events."""
    store = SqlStore(sqlite_url)
    action = make_action()
    with store.transaction() as tx:
        tx.insert_action(action)
        for i in range(6):
            tx.append_audit(
                make_draft(action.id, at=T0 + timedelta(seconds=i), data={"i": i, "deny": []})
            )
    assert verify_chain(store.audit_events()).ok
    yield store
    store.close()


def _tamper(store: SqlStore, *statements: tuple[str, dict[str, object]]) -> None:
    with store.engine.begin() as conn:
        for sql, params in statements:
            conn.execute(text(sql), params)


def test_store_row_with_changed_actor(logged: SqlStore) -> None:
    _tamper(
        logged, ("UPDATE audit_events SET actor = :who WHERE seq = :seq", {"who": "m", "seq": 3})
    )
    assert verify_chain(logged.audit_events()).first_bad_seq == 3


def test_store_row_with_changed_data(logged: SqlStore) -> None:
    _tamper(
        logged,
        ("UPDATE audit_events SET data = :data WHERE seq = :seq", {"data": '{"i":1}', "seq": 2}),
    )
    report = verify_chain(logged.audit_events())
    assert report.first_bad_seq == 2
    assert report.problem is not None and "content changed" in report.problem


def test_store_row_with_changed_time(logged: SqlStore) -> None:
    _tamper(
        logged,
        (
            "UPDATE audit_events SET at = :at WHERE seq = :seq",
            {"at": "2020-01-01 00:00:00.000000", "seq": 5},
        ),
    )
    assert verify_chain(logged.audit_events()).first_bad_seq == 5


def test_store_row_deleted(logged: SqlStore) -> None:
    _tamper(logged, ("DELETE FROM audit_events WHERE seq = :seq", {"seq": 3}))
    report = verify_chain(logged.audit_events())
    assert report.first_bad_seq == 4
    assert report.events == 3


def test_store_row_inserted(logged: SqlStore) -> None:
    events = list(logged.audit_events())
    forged = seal(make_draft(None, actor="mallory"), seq=3, prev_hash=events[1].hash)
    _tamper(
        logged,
        # Make room at seq 3 (via a detour: the primary key is checked row by row).
        ("UPDATE audit_events SET seq = seq + 1000 WHERE seq >= :seq", {"seq": 3}),
        ("UPDATE audit_events SET seq = seq - 999 WHERE seq >= :big", {"big": 1000}),
        (
            "INSERT INTO audit_events (seq, id, at, action_id, kind, actor, from_state, "
            "to_state, data, prev_hash, hash) VALUES (:seq, :id, :at, :action_id, :kind, "
            ":actor, :from_state, :to_state, :data, :prev_hash, :hash)",
            {
                **forged.model_dump(exclude={"at", "data"}),
                "at": forged.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f"),
                "data": '{"deny":[]}',
            },
        ),
    )
    report = verify_chain(logged.audit_events())
    assert report.events == 4
    assert report.first_bad_seq == 4  # the real third event no longer links
    assert report.first_bad_id == events[2].id


def test_store_rows_reordered(logged: SqlStore) -> None:
    events = list(logged.audit_events())
    _tamper(
        logged,
        ("UPDATE audit_events SET seq = -1 WHERE seq = :a", {"a": 2}),
        ("UPDATE audit_events SET seq = :a WHERE seq = :b", {"a": 2, "b": 3}),
        ("UPDATE audit_events SET seq = :b WHERE seq = -1", {"b": 3}),
    )
    report = verify_chain(logged.audit_events())
    assert report.first_bad_seq == 2
    assert report.first_bad_id == events[2].id
