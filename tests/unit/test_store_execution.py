"""Executions, measurements and workers: the store contract on memory, SQLite and PostgreSQL."""

from __future__ import annotations

import math
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import column, func, insert, select, table
from sqlalchemy.exc import IntegrityError

from opsgate.models import (
    EXECUTION_KEY_FIELDS,
    MUTABLE_EXECUTION_FIELDS,
    Action,
    ActionState,
    Execution,
    ExecutionUpdate,
    Measurement,
    WorkerInfo,
)
from opsgate.store import Store, StoreError
from opsgate.store.base import TargetBusy
from opsgate.store.sql import SqlStore, execution_to_row
from opsgate.store.tables import executions
from opsgate.testing import make_action, make_draft, make_execution, make_measurement

T0 = datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC)
PLUS_TWO = timezone(timedelta(hours=2))


class Boom(Exception):
    pass


def _actions(store: Store, count: int = 1, **overrides: Any) -> list[Action]:
    made = [make_action(**overrides) for _ in range(count)]
    with store.transaction() as tx:
        for action in made:
            tx.insert_action(action)
    return made


def _execute(store: Store, **overrides: Any) -> Execution:
    """A committed action with a committed execution of it."""
    (action,) = _actions(store)
    execution = make_execution(action.id, **overrides)
    with store.transaction() as tx:
        tx.insert_execution(execution)
    return execution


def _is_postgresql(store: Store) -> bool:
    return isinstance(store, SqlStore) and store.dialect == "postgresql"


def _wait_for_a_blocked_session(store: SqlStore) -> None:
    """Return once another PostgreSQL session waits on a lock (on our uncommitted row)."""
    activity = table("pg_stat_activity", column("wait_event_type"), column("datname"))
    blocked = (
        select(func.count())
        .select_from(activity)
        .where(activity.c.wait_event_type == "Lock", activity.c.datname == func.current_database())
    )
    deadline = time.monotonic() + 10
    with store.engine.connect() as conn:
        while conn.execute(blocked).scalar_one() == 0:
            assert time.monotonic() < deadline, "the other transaction never blocked"
            time.sleep(0.01)
            conn.rollback()  # a fresh snapshot of pg_stat_activity on the next poll


def _in_utc(*stamps: datetime | None) -> bool:
    return all(s is not None and s.utcoffset() == timedelta(0) for s in stamps)


# --- executions ----------------------------------------------------------------------------


def test_execution_round_trip_keeps_every_field(store: Store) -> None:
    (action,) = _actions(store)
    execution = make_execution(
        action.id,
        worker_id="host-a:4242",
        claimed_at=T0,
        lease_expires_at=T0 + timedelta(seconds=30, microseconds=1),
        heartbeat_at=(T0 + timedelta(seconds=5)).astimezone(PLUS_TWO),
        captured={"previous_replicas": 3, "nested": {"ok": True, "ratio": 0.25}},
        capture_output="3\n",
        baseline={"error_rate": 0.31, "error_spike": None},
        run_started_at=T0 + timedelta(seconds=1),
        run_finished_at=T0 + timedelta(seconds=2, microseconds=999999),
        run_exit_code=0,
        run_output="deployment.apps/checkout scaled\nnaïve ✓",
        run_error="stderr: warning",
        verify_started_at=T0 + timedelta(seconds=3),
        verify_state={"passing_since": None, "failures": 1, "values": [0.1, 0.02]},
        outcome="stopped",
        reason="error_spike at 0.31 is in its halt range",
        trigger_name="error_spike",
        trigger_kind="stop_condition",
        trigger_value=0.31,
        rollback_decided_at=T0 + timedelta(seconds=40),
        rollback_requested_by="bob",
        undo_started_at=T0 + timedelta(seconds=41),
        undo_finished_at=T0 + timedelta(seconds=42),
        undo_exit_code=1,
        undo_output="scaled back",
        undo_error="exit 1",
        rollback_verify_state={"passing_since": "2026-11-23T10:01:00+00:00", "failures": 0},
        rollback_verified_at=T0 + timedelta(minutes=3, microseconds=7),
        finished_at=T0 + timedelta(minutes=3, microseconds=8),
        recovered_from="host-b:17",
    )
    # Guards the test itself: a field added to Execution later must be set here too.
    assert [n for n, v in execution if v in (None, "", {})] == []
    with store.transaction() as tx:
        tx.insert_execution(execution)
        assert tx.lock_execution(action.id) == execution
    loaded = store.get_execution(action.id)
    assert loaded == execution
    assert loaded is not None
    assert _in_utc(*(v for _, v in loaded if isinstance(v, datetime)))
    assert loaded.heartbeat_at == T0 + timedelta(seconds=5)
    assert loaded.claimed_at.microsecond == 123456
    assert loaded.rollback_time == pytest.approx(140.000007)
    assert store.get_execution("missing") is None


def test_a_fresh_claim_has_the_defaults(store: Store) -> None:
    execution = _execute(store, claimed_at=T0.replace(tzinfo=None))  # naive means UTC
    loaded = store.get_execution(execution.action_id)
    assert loaded == execution.model_copy(update={"claimed_at": T0})
    assert loaded is not None
    assert loaded.claimed_at == T0 and _in_utc(loaded.claimed_at)
    assert loaded.captured == {} and loaded.verify_state is None and loaded.outcome is None
    assert not loaded.run_may_have_started


def test_an_execution_of_a_missing_action_is_refused(store: Store) -> None:
    with pytest.raises(StoreError) as raised, store.transaction() as tx:
        tx.insert_execution(make_execution("no-such-action"))
    assert not isinstance(raised.value, TargetBusy)
    assert store.row_counts()["executions"] == 0


def test_a_second_execution_of_one_action_is_refused(store: Store) -> None:
    running = _execute(store)
    with pytest.raises(TargetBusy), store.transaction() as tx:
        tx.insert_execution(running)
    finished = _execute(store, target="payments", finished_at=T0)
    with pytest.raises(StoreError) as raised, store.transaction() as tx:
        tx.insert_execution(finished.model_copy(update={"finished_at": None}))
    assert not isinstance(raised.value, TargetBusy)
    assert store.get_execution(running.action_id) == running
    assert store.get_execution(finished.action_id) == finished
    assert store.row_counts()["executions"] == 2


def test_update_execution_changes_mutable_fields(store: Store) -> None:
    execution = _execute(store, claimed_at=T0)
    later = T0 + timedelta(minutes=2, microseconds=3)
    changes: dict[str, Any] = {
        "worker_id": "w2",
        "recovered_from": "w1",
        "lease_expires_at": later.astimezone(PLUS_TWO),
        "run_started_at": later,
        "verify_state": {"failures": 2},
        "outcome": "failed_verification",
        "trigger_value": math.inf,
        "finished_at": later,
    }
    with store.transaction() as tx:
        assert tx.lock_execution(execution.action_id) == execution
        updated = tx.update_execution(execution.action_id, ExecutionUpdate(**changes))
        assert tx.update_execution(execution.action_id, ExecutionUpdate()) == updated
    expected = execution.model_copy(update={**changes, "lease_expires_at": later})
    assert updated == expected
    assert store.get_execution(execution.action_id) == expected
    assert _in_utc(updated.lease_expires_at, updated.finished_at)
    assert updated.trigger_value == math.inf


# action_id is update_execution's own first argument, so it cannot be passed as a field.
@pytest.mark.parametrize("field", sorted(EXECUTION_KEY_FIELDS - {"action_id"}))
def test_update_execution_refuses_key_fields(store: Store, field: str) -> None:
    execution = _execute(store)
    value = T0 if field == "claimed_at" else "other"
    with pytest.raises(ValueError, match=field), store.transaction() as tx:
        tx.update_execution(execution.action_id, ExecutionUpdate(**{field: value}, finished_at=T0))
    assert store.get_execution(execution.action_id) == execution


def test_an_execution_update_names_exactly_the_mutable_fields() -> None:
    assert set(ExecutionUpdate.model_fields) == MUTABLE_EXECUTION_FIELDS
    assert ExecutionUpdate(finished_at=None).changes() == {"finished_at": None}
    assert ExecutionUpdate().changes() == {}


def test_update_execution_refuses_bad_values_and_missing_rows(store: Store) -> None:
    execution = _execute(store)
    with pytest.raises(ValueError, match="outcome"):
        ExecutionUpdate(outcome="exploded")  # type: ignore[arg-type]
    # None is a value an update may carry, but not for a field an execution needs.
    with pytest.raises(ValueError, match="invalid worker_id") as raised, store.transaction() as tx:
        tx.update_execution(execution.action_id, ExecutionUpdate(worker_id=None))
    assert "\n" not in str(raised.value)
    assert store.get_execution(execution.action_id) == execution
    with pytest.raises(StoreError, match="no execution"), store.transaction() as tx:
        tx.update_execution("missing", ExecutionUpdate(finished_at=T0))
    with pytest.raises(StoreError, match="no execution"), store.transaction() as tx:
        tx.update_execution("missing", ExecutionUpdate())
    with store.transaction() as tx:
        assert tx.lock_execution("missing") is None


def test_target_busy_while_another_execution_is_unfinished(store: Store) -> None:
    first = _execute(store)
    second, elsewhere = _actions(store, 2)
    before = store.row_counts()
    with pytest.raises(TargetBusy) as raised, store.transaction() as tx:
        tx.insert_execution(make_execution(second.id))
    assert str(raised.value) == "another action is executing on checkout (prod)"
    assert store.row_counts() == before
    assert store.get_execution(second.id) is None

    # The refusal leaves the transaction usable: what else it did is committed.
    with store.transaction() as tx:
        with pytest.raises(TargetBusy):
            tx.insert_execution(make_execution(second.id))
        tx.insert_execution(make_execution(elsewhere.id, environment="staging"))
    assert store.count_running_on_target("checkout", "staging") == 1

    with store.transaction() as tx:
        tx.update_execution(first.action_id, ExecutionUpdate(finished_at=T0))
    with store.transaction() as tx:
        tx.insert_execution(make_execution(second.id))
    assert store.count_running_on_target("checkout", "prod") == 1
    assert store.row_counts()["executions"] == 3

    # Reopening the finished one would put two on the target: the database refuses it.
    with pytest.raises(StoreError), store.transaction() as tx:
        tx.update_execution(first.action_id, ExecutionUpdate(finished_at=None))
    reopened = store.get_execution(first.action_id)
    assert reopened is not None and reopened.finished_at == T0


def test_the_database_itself_refuses_two_unfinished_executions(store: Store) -> None:
    """The unique index holds even for a writer that skips the check in `insert_execution`."""
    if not isinstance(store, SqlStore):
        pytest.skip("a property of the SQL schema")
    one, two, three = _actions(store, 3)
    with store.engine.begin() as conn:
        conn.execute(insert(executions), execution_to_row(make_execution(one.id)))
        conn.execute(insert(executions), execution_to_row(make_execution(two.id, finished_at=T0)))
    with pytest.raises(IntegrityError), store.engine.begin() as conn:
        conn.execute(insert(executions), execution_to_row(make_execution(three.id)))


def test_racing_claims_on_one_target_let_one_win(store: Store) -> None:
    """Two PostgreSQL transactions both see the target free; the unique index decides."""
    if not _is_postgresql(store):
        pytest.skip("SQLite and memory serialise writers, so the count check cannot race")
    first, second = _actions(store, 2)
    inserted = threading.Event()
    outcome: list[BaseException] = []

    def loser() -> None:
        inserted.wait(timeout=10)
        try:
            with store.transaction() as tx:
                # Sees no committed execution, so it inserts and waits on the index.
                tx.insert_execution(make_execution(second.id))
        except BaseException as exc:  # examined by the main thread below
            outcome.append(exc)

    worker = threading.Thread(target=loser)
    worker.start()
    assert isinstance(store, SqlStore)
    with store.transaction() as tx:
        tx.insert_execution(make_execution(first.id))
        inserted.set()
        _wait_for_a_blocked_session(store)
    worker.join(timeout=10)
    assert len(outcome) == 1 and isinstance(outcome[0], TargetBusy), outcome
    assert "checkout (prod)" in str(outcome[0])
    assert store.get_execution(second.id) is None

    # A race lost at the index refuses like the count check does: nothing inserted, and
    # the transaction stays usable (ON CONFLICT DO NOTHING), so what else it did commits.
    racer = threading.Event()
    swallowed: list[TargetBusy] = []

    def swallowing_loser() -> None:
        racer.wait(timeout=10)
        try:
            with store.transaction() as tx:
                try:
                    tx.insert_execution(make_execution(second.id))
                except TargetBusy as exc:
                    swallowed.append(exc)
                tx.append_audit(make_draft(second.id, kind="claim.refused"))
        except BaseException as exc:  # examined by the main thread below
            outcome.append(exc)

    with store.transaction() as tx:
        tx.update_execution(first.id, ExecutionUpdate(finished_at=T0))
    (third,) = _actions(store)
    worker = threading.Thread(target=swallowing_loser)
    worker.start()
    with store.transaction() as tx:
        tx.insert_execution(make_execution(third.id))
        racer.set()
        _wait_for_a_blocked_session(store)
    worker.join(timeout=10)
    assert len(swallowed) == 1
    assert len(outcome) == 1, outcome
    assert store.get_execution(second.id) is None
    assert [e.kind for e in store.audit_events(action_id=second.id)] == ["claim.refused"]


def test_count_running_on_target(store: Store) -> None:
    running = [_execute(store), _execute(store, environment="staging")]
    _execute(store, target="payments")
    _execute(store, finished_at=T0)
    with store.transaction() as tx:
        assert tx.count_running_on_target("checkout", "prod") == 1
        assert tx.count_running_on_target("checkout", "prod", exclude_id=running[0].action_id) == 0
        assert tx.count_running_on_target("checkout", "prod", exclude_id="other") == 1
    assert store.count_running_on_target("checkout", "prod") == 1
    assert store.count_running_on_target("checkout", "staging") == 1
    assert store.count_running_on_target("payments", "prod") == 1
    assert store.count_running_on_target("checkout", "prod", exclude_id=running[0].action_id) == 0
    assert store.count_running_on_target("nothing", "prod") == 0


# --- claiming ------------------------------------------------------------------------------


def test_claim_next_approved_takes_the_oldest_unexpired_approved_action(store: Store) -> None:
    now = T0
    approved = ActionState.APPROVED
    skipped = [
        make_action(state=approved, created_at=now - timedelta(hours=5), expires_at=now),
        make_action(
            state=approved, created_at=now - timedelta(hours=4), expires_at=now - timedelta(1)
        ),
        make_action(state=ActionState.PENDING_APPROVAL, created_at=now - timedelta(hours=3)),
        make_action(state=ActionState.EXECUTING, created_at=now - timedelta(hours=3)),
        make_action(state=ActionState.SUCCEEDED, created_at=now - timedelta(hours=3)),
    ]
    oldest = make_action(
        state=approved, created_at=now - timedelta(hours=2), expires_at=now + timedelta(seconds=1)
    )
    newer = make_action(state=approved, created_at=now - timedelta(hours=1), expires_at=None)
    with store.transaction() as tx:
        for action in [newer, oldest, *skipped]:
            tx.insert_action(action)
    with store.transaction() as tx:
        assert tx.claim_next_approved(now) == oldest
        tx.update_action(oldest.id, state=ActionState.EXECUTING)
    with store.transaction() as tx:
        assert tx.claim_next_approved(now.astimezone(PLUS_TWO)) == newer
        tx.update_action(newer.id, state=ActionState.EXECUTING)
    with store.transaction() as tx:
        assert tx.claim_next_approved(now) is None


def test_claim_breaks_created_at_ties_by_id(store: Store) -> None:
    made = _actions(store, 3, state=ActionState.APPROVED, created_at=T0, expires_at=None)
    with store.transaction() as tx:
        claimed = tx.claim_next_approved(T0)
    assert claimed is not None and claimed.id == min(a.id for a in made)


def test_concurrent_claims_take_different_actions(store: Store) -> None:
    """FOR UPDATE SKIP LOCKED: a claimed row is skipped by others until the claim commits."""
    if not _is_postgresql(store):
        pytest.skip("SQLite and memory serialise writers: one claim at a time")
    made = _actions(store, 3, state=ActionState.APPROVED, expires_at=None)
    both_claimed = threading.Barrier(2, timeout=10)
    claimed: list[str | None] = []
    errors: list[BaseException] = []

    def claim() -> None:
        try:
            with store.transaction() as tx:
                action = tx.claim_next_approved(T0)
                claimed.append(action.id if action is not None else None)
                both_claimed.wait()  # holds this claim until the other one has claimed too
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=claim) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
    assert errors == []
    oldest_two = sorted(made, key=lambda a: (a.created_at, a.id))[:2]
    assert sorted(c or "" for c in claimed) == sorted(a.id for a in oldest_two)


# --- measurements --------------------------------------------------------------------------


def test_measurements_round_trip_in_insertion_order(store: Store) -> None:
    action, other = _actions(store, 2)
    values: list[float | None] = [0.002, None, math.inf, -math.inf, 0.0, 1e-12, 1e300]
    taken = [
        make_measurement(
            action.id,
            # Taken out of time order on purpose: insertion order is what counts.
            at=(T0 - timedelta(seconds=i)).astimezone(PLUS_TWO) if i % 2 else T0,
            value=value,
            outcome="inconclusive" if value is None else "pass",
            detail="no data" if value is None else f"naïve ✓ {i}",
        )
        for i, value in enumerate(values)
    ]
    taken += [
        make_measurement(action.id, phase="run", kind="stop_condition", name="error_spike"),
        make_measurement(action.id, phase="rollback", outcome="error", value=None),
    ]
    with store.transaction() as tx:
        tx.insert_measurements(taken[:4])
        tx.insert_measurements([])
        tx.insert_measurements(taken[4:])
        tx.insert_measurements([make_measurement(other.id)])
    loaded = store.measurements_for(action.id)
    assert loaded == taken
    assert [m.value for m in loaded[: len(values)]] == values
    assert math.isinf(loaded[2].value or 0) and (loaded[3].value or 0) < 0
    assert all(_in_utc(m.at) for m in loaded)
    assert len(store.measurements_for(other.id)) == 1
    assert store.measurements_for("missing") == []
    assert store.row_counts()["measurements"] == len(taken) + 1


def test_measurements_of_a_missing_action_are_refused(store: Store) -> None:
    (action,) = _actions(store)
    with pytest.raises(StoreError), store.transaction() as tx:
        tx.insert_measurements([make_measurement(action.id), make_measurement("missing")])
    assert store.measurements_for(action.id) == []


def test_empty_measurements_are_a_no_op(store: Store) -> None:
    before = store.row_counts()
    with store.transaction() as tx:
        tx.insert_measurements([])
    assert store.row_counts() == before


# --- workers and leases --------------------------------------------------------------------


def _worker(worker_id: str, heartbeat_at: datetime, **overrides: Any) -> WorkerInfo:
    fields: dict[str, Any] = {
        "id": worker_id,
        "hostname": "ops-1",
        "pid": 4242,
        "started_at": T0,
        "heartbeat_at": heartbeat_at,
    }
    fields.update(overrides)
    return WorkerInfo.model_validate(fields)


def test_workers_register_replace_stop_and_list(store: Store) -> None:
    w1 = _worker("w1", T0 + timedelta(seconds=1))
    w2 = _worker("w2", T0 + timedelta(seconds=3), hostname="ops-2", pid=7)
    w3 = _worker("w3", (T0 + timedelta(seconds=2)).astimezone(PLUS_TWO))
    for worker in (w1, w2, w3):
        store.register_worker(worker)
    assert [w.id for w in store.list_workers()] == ["w2", "w3", "w1"]
    assert store.list_workers()[1] == w3 and _in_utc(store.list_workers()[1].heartbeat_at)

    # A restart under the same id replaces the row, including a previous stop.
    store.stop_worker("w1", T0 + timedelta(seconds=4))
    restarted = _worker(
        "w1", T0 + timedelta(seconds=9), hostname="ops-9", pid=99, started_at=T0 + timedelta(9)
    )
    store.register_worker(restarted)
    listed = store.list_workers()
    assert [w.id for w in listed] == ["w1", "w2", "w3"]
    assert listed[0] == restarted and listed[0].stopped_at is None
    assert store.row_counts()["workers"] == 3

    store.stop_worker("w2", (T0 + timedelta(seconds=10)).astimezone(PLUS_TWO))
    store.stop_worker("never-registered", T0)
    stopped = {w.id: w.stopped_at for w in store.list_workers()}
    assert stopped == {"w1": None, "w2": T0 + timedelta(seconds=10), "w3": None}
    assert _in_utc(stopped["w2"])
    assert store.row_counts()["workers"] == 3


def test_list_workers_breaks_heartbeat_ties_by_id(store: Store) -> None:
    for worker_id in ("wb", "wc", "wa"):
        store.register_worker(_worker(worker_id, T0))
    assert [w.id for w in store.list_workers()] == ["wa", "wb", "wc"]


def test_renew_leases_renews_only_this_workers_unfinished_executions(store: Store) -> None:
    store.register_worker(_worker("w1", T0))
    store.register_worker(_worker("w2", T0))
    mine = [
        _execute(store, worker_id="w1", target=f"svc-{i}", lease_expires_at=T0) for i in range(2)
    ]
    finished = _execute(store, worker_id="w1", target="svc-done", finished_at=T0)
    theirs = _execute(store, worker_id="w2", target="svc-other", lease_expires_at=T0)
    now = T0 + timedelta(seconds=20)
    until = (now + timedelta(seconds=30)).astimezone(PLUS_TWO)

    assert store.renew_leases("w1", now, until) == 2

    for execution in mine:
        renewed = store.get_execution(execution.action_id)
        assert renewed == execution.model_copy(
            update={"lease_expires_at": now + timedelta(seconds=30), "heartbeat_at": now}
        )
        assert renewed is not None and _in_utc(renewed.lease_expires_at, renewed.heartbeat_at)
    assert store.get_execution(finished.action_id) == finished
    assert store.get_execution(theirs.action_id) == theirs
    heartbeats = {w.id: w.heartbeat_at for w in store.list_workers()}
    assert heartbeats == {"w1": now, "w2": T0}
    assert store.renew_leases("nobody", now, until) == 0


def test_lapsed_executions(store: Store) -> None:
    now = T0
    late = _execute(store, target="a", lease_expires_at=now - timedelta(seconds=1))
    later = _execute(store, target="b", lease_expires_at=now - timedelta(minutes=5))
    _execute(store, target="c", lease_expires_at=now)
    _execute(store, target="d", lease_expires_at=now + timedelta(seconds=1))
    _execute(store, target="e", lease_expires_at=now - timedelta(hours=1), finished_at=now)
    assert store.lapsed_executions(now) == [later, late]
    assert store.lapsed_executions(now.astimezone(PLUS_TWO)) == [later, late]
    assert store.lapsed_executions(now - timedelta(hours=1)) == []


# --- transactions --------------------------------------------------------------------------


def test_a_failed_transaction_leaves_no_execution_or_measurement(store: Store) -> None:
    running = _execute(store)
    (doomed,) = _actions(store)
    before = store.row_counts()
    with pytest.raises(Boom), store.transaction() as tx:
        tx.update_execution(running.action_id, ExecutionUpdate(finished_at=T0, outcome="succeeded"))
        tx.insert_execution(make_execution(doomed.id, target="payments"))
        tx.insert_measurements([make_measurement(doomed.id), make_measurement(running.action_id)])
        raise Boom
    assert store.row_counts() == before
    assert store.get_execution(doomed.id) is None
    assert store.get_execution(running.action_id) == running
    assert store.measurements_for(doomed.id) == []
    assert store.measurements_for(running.action_id) == []


def test_stored_executions_do_not_alias_caller_objects(store: Store) -> None:
    captured = {"previous_replicas": 3}
    execution = _execute(store, captured=captured)
    execution.captured["previous_replicas"] = 99
    loaded = store.get_execution(execution.action_id)
    assert loaded is not None and loaded.captured == {"previous_replicas": 3}
    loaded.captured["previous_replicas"] = 100
    again = store.get_execution(execution.action_id)
    assert again is not None and again.captured == {"previous_replicas": 3}


def test_measurement_model_accepts_the_run_phase() -> None:
    measurement = make_measurement("a", phase="run")
    assert isinstance(measurement, Measurement) and measurement.phase == "run"


def test_save_verification_states_stores_many_and_reports_owners(store: Store) -> None:
    first = _execute(store, worker_id="w1", target="a")
    second = _execute(store, worker_id="w2", target="b", rollback_requested_by="carol")
    states = {
        first.action_id: {"started_at": "2026-11-23T10:00:00+00:00", "intervals": 3},
        second.action_id: {"started_at": "2026-11-23T10:00:01+00:00", "intervals": 1},
    }
    with store.transaction() as tx:
        owners = tx.save_verification_states("rollback_verify_state", states)
        with pytest.raises(ValueError, match="not a verification state field"):
            tx.save_verification_states("reason", {})
    assert owners == {first.action_id: ("w1", None), second.action_id: ("w2", "carol")}
    saved = store.get_execution(first.action_id)
    assert saved is not None and saved.rollback_verify_state == states[first.action_id]
    assert saved.verify_state is None
