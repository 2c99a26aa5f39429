"""The store contract, run against memory, SQLite and PostgreSQL (the `store` fixture)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from opsgate.audit import GENESIS_HASH, verify_chain
from opsgate.models import ActionState, DenyReason, Identity
from opsgate.store import DuplicateIdempotencyKey, Store, StoreError, open_store
from opsgate.store.sql import SqlStore
from opsgate.testing import (
    MemoryStore,
    make_action,
    make_approval,
    make_decision,
    make_draft,
)

T0 = datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC)


class Boom(Exception):
    pass


def test_action_round_trip_keeps_every_field(store: Store) -> None:
    action = make_action(
        created_at=T0,
        updated_at=T0 + timedelta(microseconds=1),
        expires_at=T0 + timedelta(hours=1, microseconds=7),
        idempotency_key="deploy-42",
        params={"deployment": "checkout", "replicas": 6, "ratio": 0.25, "dry": False},
        approver_roles=("sre", "lead"),
        proposer=Identity(id="agent-7", kind="agent"),
    )
    with store.transaction() as tx:
        tx.insert_action(action)
    loaded = store.get_action(action.id)
    assert loaded == action
    assert loaded is not None
    for stamp in (loaded.created_at, loaded.updated_at, loaded.expires_at):
        assert stamp is not None
        assert stamp.tzinfo is not None and stamp.utcoffset() == timedelta(0)
    assert loaded.created_at.microsecond == 123456
    assert store.find_action_by_idempotency_key("deploy-42", action.proposer.id) == action
    assert store.find_action_by_idempotency_key("nope", action.proposer.id) is None
    assert store.find_action_by_idempotency_key("deploy-42", "someone-else") is None
    assert store.get_action("missing") is None


def test_offset_datetimes_come_back_as_the_same_instant_in_utc(store: Store) -> None:
    plus_two = timezone(timedelta(hours=2))
    action = make_action(created_at=T0.astimezone(plus_two), expires_at=None)
    with store.transaction() as tx:
        tx.insert_action(action)
    loaded = store.get_action(action.id)
    assert loaded is not None
    assert loaded.created_at == T0
    assert loaded.created_at.utcoffset() == timedelta(0)
    assert loaded.expires_at is None


def test_naive_datetimes_are_taken_as_utc(store: Store) -> None:
    naive = T0.replace(tzinfo=None)
    action = make_action(created_at=naive, updated_at=naive, expires_at=naive)
    with store.transaction() as tx:
        tx.insert_action(action)
    loaded = store.get_action(action.id)
    assert loaded is not None
    assert loaded.created_at == T0 and loaded.created_at.tzinfo is not None
    assert [a.id for a in store.due_for_expiry(naive)] == [action.id]


def test_decision_and_approval_round_trip(store: Store) -> None:
    action = make_action()
    denied = make_decision(
        action.id,
        allow=False,
        deny=(DenyReason(code="param_out_of_bounds", message="replicas over 200"),),
        result=None,
        error="engine timed out",
        decided_at=T0,
    )
    allowed = make_decision(action.id, phase="approval", decided_at=T0 + timedelta(seconds=1))
    approval = make_approval(action.id, comment="looks right", created_at=T0)
    with store.transaction() as tx:
        tx.insert_action(action)
        tx.insert_decision(allowed)
        tx.insert_decision(denied)
        tx.insert_approval(approval)
        assert tx.approvals_for(action.id) == [approval]
    assert store.decisions_for(action.id) == [denied, allowed]
    assert store.decisions_for(action.id)[0].deny_codes == ["param_out_of_bounds"]
    assert store.approvals_for(action.id) == [approval]
    assert store.approvals_for("other") == []


def test_idempotency_key_is_unique(store: Store) -> None:
    first = make_action(idempotency_key="same")
    with store.transaction() as tx:
        tx.insert_action(first)
    before = store.row_counts()
    with pytest.raises(DuplicateIdempotencyKey), store.transaction() as tx:
        tx.insert_action(make_action(idempotency_key="other"))
        tx.insert_action(make_action(idempotency_key="same"))
    assert store.row_counts() == before
    assert store.find_action_by_idempotency_key("same", first.proposer.id) == first
    # Actions without a key never collide.
    with store.transaction() as tx:
        tx.insert_action(make_action())
        tx.insert_action(make_action())
    assert store.row_counts()["actions"] == before["actions"] + 2
    # Scoped to the proposer: another proposer's same key is another action.
    other = make_action(idempotency_key="same")
    other = other.model_copy(update={"proposer": Identity(id="mallory", kind="human")})
    with store.transaction() as tx:
        tx.insert_action(other)
    assert store.find_action_by_idempotency_key("same", "mallory") == other
    assert store.find_action_by_idempotency_key("same", first.proposer.id) == first


def test_duplicate_key_leaves_the_transaction_usable(store: Store) -> None:
    with store.transaction() as tx:
        tx.insert_action(make_action(idempotency_key="k"))
    later = make_action()
    with store.transaction() as tx:
        with pytest.raises(DuplicateIdempotencyKey):
            tx.insert_action(make_action(idempotency_key="k"))
        tx.insert_action(later)
    assert store.get_action(later.id) == later


def test_duplicate_primary_key_is_a_store_error(store: Store) -> None:
    action = make_action()
    with store.transaction() as tx:
        tx.insert_action(action)
    with pytest.raises(StoreError) as raised, store.transaction() as tx:
        tx.insert_action(action)
    assert not isinstance(raised.value, DuplicateIdempotencyKey)
    assert "\n" not in str(raised.value)


def test_list_actions_oldest_first_with_filters(store: Store) -> None:
    made = [
        make_action(created_at=T0 + timedelta(minutes=3), state=ActionState.BLOCKED),
        make_action(created_at=T0 + timedelta(minutes=1)),
        make_action(created_at=T0 + timedelta(minutes=2), proposer=Identity(id="bob")),
        make_action(created_at=T0, state=ActionState.APPROVED),
    ]
    with store.transaction() as tx:
        for action in made:
            tx.insert_action(action)
    assert [a.id for a in store.list_actions()] == [made[i].id for i in (3, 1, 2, 0)]
    pending = store.list_actions(states=[ActionState.PENDING_APPROVAL])
    assert [a.id for a in pending] == [made[1].id, made[2].id]
    both = store.list_actions(states={ActionState.APPROVED, ActionState.BLOCKED})
    assert [a.id for a in both] == [made[3].id, made[0].id]
    assert [a.id for a in store.list_actions(proposer_id="bob")] == [made[2].id]
    assert [a.id for a in store.list_actions(limit=2)] == [made[3].id, made[1].id]
    assert store.list_actions(states=[]) == []


def test_due_for_expiry(store: Store) -> None:
    now = T0
    due_pending = make_action(expires_at=now - timedelta(seconds=1))
    due_approved = make_action(expires_at=now - timedelta(hours=1), state=ActionState.APPROVED)
    exactly_now = make_action(expires_at=now)
    later = make_action(expires_at=now + timedelta(microseconds=1))
    never = make_action(expires_at=None)
    finished = make_action(expires_at=now - timedelta(hours=2), state=ActionState.REJECTED)
    with store.transaction() as tx:
        for action in (due_pending, due_approved, exactly_now, later, never, finished):
            tx.insert_action(action)
    due = store.due_for_expiry(now)
    assert [a.id for a in due] == [due_approved.id, due_pending.id, exactly_now.id]


def test_count_active_on_target(store: Store) -> None:
    active = [
        make_action(state=ActionState.APPROVED),
        make_action(state=ActionState.EXECUTING),
        make_action(state=ActionState.VERIFYING),
        make_action(state=ActionState.ROLLING_BACK),
    ]
    inactive = [
        make_action(state=ActionState.PENDING_APPROVAL),
        make_action(state=ActionState.SUCCEEDED),
        make_action(state=ActionState.EXECUTING, target="payments"),
        make_action(state=ActionState.EXECUTING, environment="staging"),
    ]
    with store.transaction() as tx:
        for action in active + inactive:
            tx.insert_action(action)
        assert tx.count_active_on_target("checkout", "prod") == 4
        assert tx.count_active_on_target("checkout", "prod", exclude_id=active[0].id) == 3
    assert store.count_active_on_target("checkout", "prod") == 4
    assert store.count_active_on_target("checkout", "prod", exclude_id=active[1].id) == 3
    assert store.count_active_on_target("nothing", "prod") == 0


def test_one_approval_per_approver(store: Store) -> None:
    action = make_action()
    with store.transaction() as tx:
        tx.insert_action(action)
        tx.insert_approval(make_approval(action.id))
        tx.insert_approval(make_approval(action.id, approver=Identity(id="carol")))
    before = store.row_counts()
    with pytest.raises(StoreError), store.transaction() as tx:
        tx.insert_approval(make_approval(action.id, comment="again"))
    assert store.row_counts() == before
    assert [a.approver.id for a in store.approvals_for(action.id)] == ["bob", "carol"]


def test_update_action_changes_only_mutable_fields(store: Store) -> None:
    action = make_action(created_at=T0, updated_at=T0)
    with store.transaction() as tx:
        tx.insert_action(action)
    later = T0 + timedelta(minutes=5, microseconds=3)
    with store.transaction() as tx:
        locked = tx.lock_action(action.id)
        assert locked == action
        updated = tx.update_action(
            action.id,
            state=ActionState.APPROVED,
            updated_at=later,
            required_approvals=2,
            approver_roles=("sre", "dba"),
            expires_at=None,
        )
    expected = action.model_copy(
        update={
            "state": ActionState.APPROVED,
            "updated_at": later,
            "required_approvals": 2,
            "approver_roles": ("sre", "dba"),
            "expires_at": None,
        }
    )
    assert updated == expected
    assert store.get_action(action.id) == expected
    for field, value in [("target", "payments"), ("params", {}), ("created_at", later)]:
        with pytest.raises(ValueError, match=field), store.transaction() as tx:
            tx.update_action(action.id, **{field: value})
    assert store.get_action(action.id) == expected


def test_update_of_a_missing_action_is_an_error(store: Store) -> None:
    with pytest.raises(StoreError), store.transaction() as tx:
        tx.update_action("missing", state=ActionState.APPROVED)
    with store.transaction() as tx:
        assert tx.lock_action("missing") is None


def test_a_failed_transaction_leaves_nothing_behind(store: Store) -> None:
    action = make_action()
    with store.transaction() as tx:
        tx.insert_action(action)
        tx.append_audit(make_draft(action.id))
    before = store.row_counts()
    head = list(store.audit_events())[-1]
    with pytest.raises(Boom), store.transaction() as tx:
        doomed = make_action()
        tx.insert_action(doomed)
        tx.insert_decision(make_decision(doomed.id))
        tx.insert_approval(make_approval(doomed.id))
        tx.update_action(action.id, state=ActionState.APPROVED)
        tx.append_audit(make_draft(doomed.id))
        raise Boom
    assert store.row_counts() == before
    assert store.get_action(doomed.id) is None
    assert store.get_action(action.id) == action
    # The head did not move: the next event links to the last committed one.
    with store.transaction() as tx:
        event = tx.append_audit(make_draft(action.id))
    assert event.seq == head.seq + 1
    assert event.prev_hash == head.hash
    assert verify_chain(store.audit_events()).ok


def test_audit_chain_is_sequential_and_verifies(store: Store) -> None:
    action = make_action()
    with store.transaction() as tx:
        tx.insert_action(action)
    appended = []
    for i in range(5):
        with store.transaction() as tx:
            appended.append(
                tx.append_audit(
                    make_draft(
                        action.id if i % 2 else None,
                        at=T0 + timedelta(seconds=i),
                        # 1e16 and 0.1 must read back exactly, or the hash breaks.
                        data={"i": i, "big": 1e16, "ratio": 0.1, "text": "naïve ✓", "n": None},
                    )
                )
            )
    events = list(store.audit_events())
    assert events == appended
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[0].prev_hash == GENESIS_HASH
    report = verify_chain(events)
    assert report.ok, report
    assert report.events == 5
    assert [e.seq for e in store.audit_events(action_id=action.id)] == [2, 4]


def test_audit_events_pages_through_long_logs(store: Store) -> None:
    with store.transaction() as tx:
        for _ in range(1203):
            tx.append_audit(make_draft(data={}))
    report = verify_chain(store.audit_events())
    assert report.ok and report.events == 1203


def test_concurrent_appends_make_one_gapless_chain(store: Store) -> None:
    threads, per_thread = 4, 10
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def append(worker: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                with store.transaction() as tx:
                    action = make_action()
                    tx.insert_action(action)
                    tx.append_audit(make_draft(action.id, actor=f"w{worker}", data={"i": i}))
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)

    workers = [threading.Thread(target=append, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    events = list(store.audit_events())
    assert [e.seq for e in events] == list(range(1, threads * per_thread + 1))
    assert verify_chain(events).ok
    assert store.row_counts()["actions"] == threads * per_thread


def test_concurrent_inserts_of_one_key_let_exactly_one_win(store: Store) -> None:
    threads = 4
    start = threading.Barrier(threads)
    outcomes: list[str] = []

    def insert() -> None:
        start.wait()
        try:
            with store.transaction() as tx:
                tx.insert_action(make_action(idempotency_key="race"))
            outcomes.append("won")
        except DuplicateIdempotencyKey:
            outcomes.append("duplicate")
        except BaseException as exc:  # reported to the main thread below
            outcomes.append(repr(exc))

    workers = [threading.Thread(target=insert) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(outcomes) == ["duplicate"] * (threads - 1) + ["won"]
    assert store.row_counts()["actions"] == 1


def test_lock_action_serialises_writers(store: Store) -> None:
    action = make_action()
    with store.transaction() as tx:
        tx.insert_action(action)
    holding = threading.Event()
    seen: list[tuple[float, ActionState]] = []

    def second_writer() -> None:
        holding.wait()
        with store.transaction() as tx:
            locked = tx.lock_action(action.id)
            assert locked is not None
            seen.append((time.monotonic(), locked.state))

    worker = threading.Thread(target=second_writer)
    worker.start()
    with store.transaction() as tx:
        assert tx.lock_action(action.id) is not None
        holding.set()
        time.sleep(0.3)
        tx.update_action(action.id, state=ActionState.APPROVED)
        released = time.monotonic()
    worker.join()
    # The second writer got the row only after the first committed, and saw its change.
    assert len(seen) == 1
    assert seen[0][0] >= released
    assert seen[0][1] is ActionState.APPROVED


def test_row_counts(store: Store) -> None:
    empty = {
        "actions": 0,
        "decisions": 0,
        "approvals": 0,
        "audit_events": 0,
        "executions": 0,
        "measurements": 0,
        "workers": 0,
        "api_tokens": 0,
        "audit_checkpoints": 0,
        "outbox": 0,
        "trust_resets": 0,
    }
    assert store.row_counts() == empty
    action = make_action()
    with store.transaction() as tx:
        tx.insert_action(action)
        tx.insert_decision(make_decision(action.id))
        tx.insert_approval(make_approval(action.id))
        tx.append_audit(make_draft(action.id))
    assert store.row_counts() == {
        **empty,
        "actions": 1,
        "decisions": 1,
        "approvals": 1,
        "audit_events": 1,
        "outbox": 1,  # the draft announces a pending approval
    }


def test_a_swallowed_statement_error_still_aborts_the_transaction(store: Store) -> None:
    action = make_action()
    with store.transaction() as tx:
        tx.insert_action(action)
        tx.insert_approval(make_approval(action.id))
    before = store.row_counts()
    with pytest.raises(StoreError, match="nothing of it was written"), store.transaction() as tx:
        tx.insert_action(make_action())
        with pytest.raises(StoreError):
            tx.insert_approval(make_approval(action.id))
    assert store.row_counts() == before


def test_decision_for_a_missing_action_is_refused(store: Store) -> None:
    with pytest.raises(StoreError), store.transaction() as tx:
        tx.insert_decision(make_decision("no-such-action"))
    assert store.row_counts()["decisions"] == 0


def test_nested_transactions_are_refused(store: Store) -> None:
    with store.transaction(), pytest.raises(StoreError, match="nesting"), store.transaction():
        pass
    # Reads inside a transaction see committed state and do not deadlock.
    action = make_action()
    with store.transaction() as tx:
        tx.insert_action(action)
        assert store.get_action(action.id) is None
    assert store.get_action(action.id) == action


def test_stored_models_do_not_alias_caller_objects(store: Store) -> None:
    action = make_action()
    with store.transaction() as tx:
        tx.insert_action(action)
    action.params["replicas"] = 999
    loaded = store.get_action(action.id)
    assert loaded is not None and loaded.params["replicas"] == 6
    loaded.params["replicas"] = 1000
    again = store.get_action(action.id)
    assert again is not None and again.params["replicas"] == 6


def test_session_user(store: Store) -> None:
    user = store.session_user()
    if isinstance(store, SqlStore) and store.dialect == "postgresql":
        assert user == "postgres"
    else:
        assert user is None


# --- opening stores and errors -----------------------------------------------------------


def test_open_store_picks_the_implementation(tmp_path: Path) -> None:
    memory = open_store("memory://")
    assert isinstance(memory, MemoryStore) and memory.url == "memory://"
    memory.migrate()
    memory.close()
    sqlite = open_store(f"sqlite:///{tmp_path}/nested/dir/o.db")
    try:
        assert isinstance(sqlite, SqlStore)
        sqlite.migrate()
        assert sqlite.row_counts()["actions"] == 0
    finally:
        sqlite.close()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@db.example/ops",
        "postgres://u:pw@db.example/ops",
        "postgresql+psycopg://u:pw@db.example/ops",
        "postgres+psycopg://u:pw@db.example/ops",
    ],
)
def test_postgresql_urls_use_psycopg_and_hide_the_password(url: str) -> None:
    store = SqlStore(url)
    try:
        assert store.url == "postgresql+psycopg://u:***@db.example/ops"
        assert store.engine.url.password == "pw"
        assert "pw" not in repr(store)
    finally:
        store.close()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "mysql://x/y", "::nope::"])
def test_unusable_urls_are_refused(url: str) -> None:
    with pytest.raises(StoreError):
        SqlStore(url)


def test_driver_errors_are_one_line_without_the_password() -> None:
    # Port 1 refuses at once: no server listens there.
    store = SqlStore("postgresql://opsgate:s3cret-pw@127.0.0.1:1/opsgate")
    try:
        with pytest.raises(StoreError) as raised:
            store.get_action("x")
        message = str(raised.value)
        assert "\n" not in message
        assert "s3cret-pw" not in message
        assert "127.0.0.1" in message
        assert raised.value.__cause__ is None and raised.value.__suppress_context__
        with pytest.raises(StoreError), store.transaction():
            pass
    finally:
        store.close()


def test_unmigrated_database_says_so(tmp_path: Path) -> None:
    (tmp_path / "empty.db").touch()
    store = SqlStore(f"sqlite:///{tmp_path}/empty.db")
    try:
        with pytest.raises(StoreError, match="migrated"):
            store.row_counts()
        with pytest.raises(StoreError, match="migrated"), store.transaction() as tx:
            tx.append_audit(make_draft())
    finally:
        store.close()


def test_only_migrate_creates_a_sqlite_database(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "o.db"
    store = SqlStore(f"sqlite:///{path}")
    try:
        for read in (store.row_counts, lambda: store.get_action("x"), store.list_workers):
            with pytest.raises(StoreError, match="there is no store at"):
                read()
        with pytest.raises(StoreError, match="there is no store at"), store.transaction() as tx:
            tx.append_audit(make_draft())
        assert not (tmp_path / "nested").exists()
        store.migrate()
        assert path.is_file() and store.row_counts()["actions"] == 0
    finally:
        store.close()


def test_sqlite_pragmas(sqlite_url: str) -> None:
    store = SqlStore(sqlite_url)
    try:
        with store.engine.connect() as conn:
            pragmas = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
    finally:
        store.close()
    # synchronous: 2 is FULL.
    assert pragmas == {
        "journal_mode": "wal",
        "synchronous": 2,
        "foreign_keys": 1,
        "busy_timeout": 30000,
    }


def test_a_transaction_writes_its_events_in_one_go(store: Store) -> None:
    """The head is locked once per transaction and its events written together before
    COMMIT: on PostgreSQL the head lock and one statement, however many events."""
    if not isinstance(store, SqlStore):
        pytest.skip("counts SQL statements")
    from sqlalchemy import event

    action = make_action()
    with store.transaction() as tx:
        tx.insert_action(action)
    sent: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        sent.append(statement)

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        with store.transaction() as tx:
            appended = [tx.append_audit(make_draft(action.id, data={"i": i})) for i in range(3)]
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    audit = [s for s in sent if "audit_" in s]
    assert len(audit) == (2 if store.dialect == "postgresql" else 3), audit
    assert list(store.audit_events()) == appended
    assert [e.seq for e in appended] == [1, 2, 3]
    assert store.audit_head() == (3, appended[-1].hash)
    assert verify_chain(store.audit_events()).ok


def test_events_of_a_failed_transaction_are_never_written(store: Store) -> None:
    action = make_action()
    with store.transaction() as tx:
        tx.insert_action(action)
        tx.append_audit(make_draft(action.id))
    with pytest.raises(Boom), store.transaction() as tx:
        tx.append_audit(make_draft(action.id))
        tx.append_audit(make_draft(action.id))
        raise Boom
    assert [e.seq for e in store.audit_events()] == [1]
    with store.transaction() as tx:
        event = tx.append_audit(make_draft(action.id))
    assert event.seq == 2
    assert verify_chain(store.audit_events()).ok


def test_events_appended_at_commit_take_the_head_last_and_keep_their_order(
    store: Store,
) -> None:
    action = make_action()
    with store.transaction() as tx:
        tx.insert_action(action)
    sent: list[str] = []
    if isinstance(store, SqlStore):
        from sqlalchemy import event as sa_event

        def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
            sent.append(statement)

        sa_event.listen(store.engine, "before_cursor_execute", count)
    try:
        with store.transaction() as tx:
            tx.append_audit_at_commit(make_draft(action.id, kind="first"))
            tx.update_action(action.id, state=ActionState.APPROVED)
            tx.append_audit_at_commit(make_draft(action.id, kind="second"))
            # An event sealed now comes after those queued before it.
            third = tx.append_audit(make_draft(action.id, kind="third"))
            tx.append_audit_at_commit(make_draft(action.id, kind="fourth"))
    finally:
        if isinstance(store, SqlStore):
            sa_event.remove(store.engine, "before_cursor_execute", count)
    events = list(store.audit_events())
    assert [(e.seq, e.kind) for e in events] == [
        (1, "first"),
        (2, "second"),
        (3, "third"),
        (4, "fourth"),
    ]
    assert third == events[2]
    assert verify_chain(events).ok
    if sent:
        # The head was locked only after the action's row was changed.
        head = next(i for i, s in enumerate(sent) if "audit_head" in s)
        update = next(i for i, s in enumerate(sent) if s.lstrip().startswith("UPDATE actions"))
        assert update < head


def test_events_for_commit_of_a_failed_transaction_are_never_sealed(store: Store) -> None:
    action = make_action()
    with store.transaction() as tx:
        tx.insert_action(action)
    with pytest.raises(Boom), store.transaction() as tx:
        tx.append_audit_at_commit(make_draft(action.id))
        raise Boom
    assert list(store.audit_events()) == []
    with store.transaction() as tx:
        tx.append_audit_at_commit(make_draft(action.id))
    assert [e.seq for e in store.audit_events()] == [1]
