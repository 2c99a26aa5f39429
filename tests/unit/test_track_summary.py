"""The track record's summary (opsgate/store/track_summary.py) against the reports' queries.

Random histories are written through the store's own operations, as the gate and the
workers write them: proposals (some blocked), approvals, rejections, expiries, claims,
runs, verdicts, automatic and manual rollbacks, a manual rollback caught half way (a run
that was finished is unfinished again), spread over more days than the window. After every
batch, for every proposer, type and environment, what a decision reads from the summary
must equal the reports' queries over the same days, outside and inside a transaction that
has written but not committed; and the summary the store kept row by row must equal the
one `rebuild` counts from scratch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from opsgate.models import Action, ActionState, DenyReason, ExecutionUpdate, Identity
from opsgate.store import Store
from opsgate.store.sql import SqlStore
from opsgate.store.summary_sql import rebuild
from opsgate.store.tables import track_record_days, track_record_latest
from opsgate.store.track_summary import (
    day_of,
    merged_days,
    window_days,
    window_start,
)
from opsgate.testing import make_action, make_decision, make_execution
from opsgate.trust import SCOPES, Figures, rollup, track_record

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
FAR = datetime(9999, 1, 1, tzinfo=UTC)
PROPOSERS = ("agent-a", "agent-b")
TYPES = ("scale_deployment", "restart_service")
ENVIRONMENTS = ("prod", "staging")


class History:
    """Drives a store through random changes, remembering what is in flight."""

    def __init__(self, store: Store, seed: int) -> None:
        self.store = store
        self.rng = random.Random(seed)
        self.pending: list[Action] = []
        self.approved: list[Action] = []
        self.running: list[str] = []  # action ids with an unfinished execution
        self.finished: list[str] = []  # finished, succeeded: may be rolled back by hand
        self.n = 0

    def when(self) -> datetime:
        # Over 120 days, so the 90-day window cuts the history; some on its first day.
        if self.rng.random() < 0.1:
            return window_start(NOW, 90) + timedelta(seconds=self.rng.randint(-3600, 3600))
        return NOW - timedelta(days=self.rng.uniform(0, 120))

    def propose(self, tx: Any) -> None:
        self.n += 1
        at = self.when()
        codes = self.rng.choice([[], [], [], ["param_out_of_bounds"], ["a", "b", "a"]])
        action = make_action(
            action_type=self.rng.choice(TYPES),
            environment=self.rng.choice(ENVIRONMENTS),
            target=f"t{self.n}",
            proposer=Identity(id=self.rng.choice(PROPOSERS), kind="agent"),
            state=ActionState.BLOCKED if codes else ActionState.PENDING_APPROVAL,
            created_at=at,
            updated_at=at,
        )
        tx.insert_action(action)
        tx.insert_decision(
            make_decision(
                action.id,
                phase="propose",
                allow=not codes,
                deny=tuple(DenyReason(code=c, message=c) for c in codes),
                decided_at=at,
            )
        )
        if not codes:
            self.pending.append(action)

    def decide(self, tx: Any) -> None:
        action = self.pending.pop(self.rng.randrange(len(self.pending)))
        tx.lock_action(action.id)
        fate = self.rng.choice(["approve", "approve", "approve", "reject", "expire"])
        if fate == "approve":
            done = tx.update_action(
                action.id,
                state=ActionState.APPROVED,
                approved_at=action.created_at + timedelta(minutes=1),
            )
            self.approved.append(done)
        elif fate == "reject":
            tx.update_action(action.id, state=ActionState.REJECTED)
        else:
            tx.update_action(action.id, state=ActionState.EXPIRED)

    def claim(self, tx: Any) -> None:
        action = self.approved.pop(self.rng.randrange(len(self.approved)))
        if self.rng.random() < 0.15:  # blocked at the execution re-check
            tx.update_action(action.id, state=ActionState.BLOCKED)
            tx.insert_decision(make_decision(action.id, phase="execute", allow=False))
            return
        started = action.created_at + timedelta(minutes=2)
        tx.update_action(action.id, state=ActionState.EXECUTING)
        tx.insert_execution(
            make_execution(
                action.id,
                target=action.target,
                environment=action.environment,
                claimed_at=started,
            )
        )
        if self.rng.random() < 0.8:  # else: claimed, never started (a lapsed lease)
            tx.update_execution(action.id, ExecutionUpdate(run_started_at=started))
        self.running.append(action.id)

    def end(self, tx: Any) -> None:
        action_id = self.running.pop(self.rng.randrange(len(self.running)))
        execution = tx.lock_execution(action_id)
        base = execution.claimed_at
        outcome = self.rng.choice(["succeeded", "succeeded", "stopped", "failed_verification"])
        if outcome == "succeeded" and execution.rollback_decided_at is None:
            tx.update_execution(
                action_id,
                ExecutionUpdate(outcome=outcome, finished_at=base + timedelta(minutes=8)),
            )
            self.finished.append(action_id)
            return
        # A verdict, then (often in a later transaction) the rollback's end.
        tx.update_execution(
            action_id,
            ExecutionUpdate(
                outcome=execution.outcome or outcome,
                rollback_decided_at=execution.rollback_decided_at or base + timedelta(minutes=5),
            ),
        )
        verified = self.rng.random() < 0.7
        tx.update_execution(
            action_id,
            ExecutionUpdate(
                rollback_verified_at=base + timedelta(minutes=9) if verified else None,
                finished_at=base + timedelta(minutes=10),
            ),
        )
        if not verified and self.rng.random() < 0.3:
            # Verified after all, in a later step: the failed rollback is taken back.
            tx.update_execution(
                action_id, ExecutionUpdate(rollback_verified_at=base + timedelta(minutes=11))
            )

    def roll_back_by_hand(self, tx: Any) -> None:
        """`opsgate rollback` of a finished run: it is unfinished again until it ends."""
        action_id = self.finished.pop(self.rng.randrange(len(self.finished)))
        execution = tx.lock_execution(action_id)
        tx.update_execution(
            action_id,
            ExecutionUpdate(
                finished_at=None,
                rollback_decided_at=execution.finished_at + timedelta(hours=1),
                rollback_requested_by="bob",
            ),
        )
        self.running.append(action_id)

    def step(self, tx: Any) -> None:
        moves = [self.propose]
        if self.pending:
            moves.append(self.decide)
        if self.approved:
            moves.append(self.claim)
        if self.running:
            moves += [self.end, self.end]
        if self.finished:
            moves.append(self.roll_back_by_hand)
        self.rng.choice(moves)(tx)


def from_reports(reader: Any, proposer: str, action_type: str, environment: str) -> dict:
    since = window_start(NOW, 90)
    facts = reader.track_record_facts(proposer, action_type, environment, since, FAR)
    return rollup(facts, action_type, environment)


def every_key() -> Iterator[tuple[str, str, str]]:
    for proposer in (*PROPOSERS, "nobody"):
        for action_type in TYPES:
            for environment in ENVIRONMENTS:
                yield proposer, action_type, environment


def assert_summary_is_the_reports(reader: Any) -> int:
    compared = 0
    since = window_start(NOW, 90)
    for key in every_key():
        summary = reader.track_record_figures(*key, since)
        reports = from_reports(reader, *key)
        assert set(summary) == set(SCOPES)
        for scope in SCOPES:
            assert summary[scope] == reports[scope], (key, scope)
            compared += summary[scope].proposals + summary[scope].executed
    return compared


def stored_summary(store: SqlStore) -> tuple[dict, dict]:
    with store.engine.connect() as conn:
        days = merged_days(dict(r._mapping) for r in conn.execute(select(track_record_days)))
        latest = {
            (r.proposer_id, r.action_type, r.environment): tuple(r[3:])
            for r in conn.execute(select(track_record_latest))
            if any(v is not None for v in r[3:])
        }
    return days, latest


@pytest.mark.parametrize("seed", [3, 4])
def test_the_summary_is_the_reports_over_random_histories(store: Store, seed: int) -> None:
    history = History(store, seed)
    counted = 0
    for _ in range(25):
        with store.transaction() as tx:
            for _ in range(history.rng.randint(1, 15)):
                history.step(tx)
            # Written, not committed: a decision in this transaction sees its own writes.
            assert_summary_is_the_reports(tx)
        counted += assert_summary_is_the_reports(store)
    assert counted > 100  # the comparisons were about something
    assert history.n > 40
    if isinstance(store, SqlStore):
        kept = stored_summary(store)
        with store.engine.begin() as conn:
            rebuild(conn, store.dialect)
        assert stored_summary(store) == kept
        assert kept[0], "the summary has rows"


def test_a_transaction_that_fails_leaves_the_summary_as_it_was(sqlite_url: str) -> None:
    store = SqlStore(sqlite_url)
    try:
        history = History(store, 5)
        with store.transaction() as tx:
            for _ in range(20):
                history.step(tx)
        before = stored_summary(store)
        with pytest.raises(RuntimeError), store.transaction() as tx:
            for _ in range(20):
                history.step(tx)
            raise RuntimeError("abandoned")
        assert stored_summary(store) == before
    finally:
        store.close()


def test_the_window_is_whole_utc_days() -> None:
    assert window_days(86400.0) == 1
    assert window_days(90 * 86400.0) == 90
    assert window_days(90 * 86400.0 + 1) == 91
    start = window_start(NOW, 90)
    assert start == datetime(2026, 8, 26, tzinfo=UTC)
    assert day_of(NOW) - day_of(start) == 89
    assert day_of(start - timedelta(microseconds=1)) == day_of(start) - 1


def test_a_decision_counts_from_the_first_midnight_of_its_window(store: Store) -> None:
    """A fact a second before the window's first midnight is out; one at midnight is in."""
    start = window_start(NOW, 90)
    with store.transaction() as tx:
        for at in (start - timedelta(seconds=1), start, NOW):
            action = make_action(
                proposer=Identity(id="agent-a", kind="agent"),
                target=f"t{at.timestamp()}",
                created_at=at,
                updated_at=at,
            )
            tx.insert_action(action)
            tx.insert_decision(make_decision(action.id, phase="propose", decided_at=at))
    action = make_action()
    record = track_record(store, "agent-a", action.action_type, action.environment, NOW)
    assert record.scopes["overall"].proposals == 2
    assert record.window.since == start
    assert isinstance(record.scopes["overall"], Figures)
