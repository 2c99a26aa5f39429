"""Prometheus exposition of opsgate's own metrics, read from the store at scrape time.

Several workers on several machines write to one database, so no process's in-memory
counters would see everything: `StoreCollector` aggregates the store itself on every
scrape (a handful of GROUP BY queries in one read snapshot). Every exporter that reads
one store shows the same store-wide numbers, so when Prometheus scrapes several of them
(`opsgate metrics serve`, `opsgate worker --metrics-port`), aggregate across instances
with `max`, not `sum`.

Counters only ever grow, as Prometheus requires (a drop reads as a counter reset):
`opsgate_actions_total` counts actions that reached each final state, and an action that
succeeded and was then rolled back by hand stays counted under `succeeded` as well.
Counts that go up and down (actions not yet final, runs and rollbacks under way,
workers) are gauges. The SQL store only: the in-memory store lives in one process and is
refused with a ConfigError.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import Connection, Float, Text, and_, case, cast, func, literal, select
from sqlalchemy.exc import SQLAlchemyError

from opsgate.errors import ConfigError
from opsgate.models import TERMINAL_STATES, ActionState
from opsgate.policies.engine import DEADLINE_EXCEEDED
from opsgate.reports.queries import NONE_LABEL
from opsgate.store.base import Store, StoreError
from opsgate.store.sql import SqlStore
from opsgate.store.tables import actions, decisions, executions

log = logging.getLogger(__name__)

DEFAULT_PORT = 9464
S = ActionState
FINAL_STATES = sorted(s.value for s in TERMINAL_STATES)
# A succeeded action rolled back by hand moves on to one of these; it keeps outcome
# `succeeded`, which is how it stays counted as having succeeded.
AFTER_MANUAL_ROLLBACK = (S.ROLLING_BACK.value, S.ROLLED_BACK.value, S.ROLLBACK_FAILED.value)
WORKER_STATUSES = ("live", "lapsed", "stopped")
# Seconds from the rollback decision to a verified rollback: a verification holds for
# minutes, so the interesting range is ~10 s to an hour.
ROLLBACK_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
# Policy decision latency, in the milliseconds `decisions.duration_ms` stores; compared
# in milliseconds so no bucket edge is a rounded product.
DECISION_BUCKETS_MS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0)
ACTION_LABELS = ("action", "environment", "proposer_kind")


@dataclass
class Histogram:
    """Cumulative bucket counts (one per upper bound, `+Inf` apart), count and sum."""

    bounds: Sequence[float]
    buckets: list[int] = field(default_factory=list)
    count: int = 0
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.buckets:
            self.buckets = [0] * len(self.bounds)

    def add(self, buckets: Iterable[Any], count: Any, total: Any) -> None:
        """Add one SQL group's row (SUM() over no rows is NULL, hence the `or 0`)."""
        self.buckets = [a + int(b or 0) for a, b in zip(self.buckets, buckets, strict=True)]
        self.count += int(count or 0)
        self.total += float(total or 0)

    def samples(self, scale: float = 1.0) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs ending with +Inf, bounds divided by `scale`."""
        pairs = [
            (floatToGoString(b / scale), float(n))
            for b, n in zip(self.bounds, self.buckets, strict=True)
        ]
        return [*pairs, ("+Inf", float(self.count))]


@dataclass
class Snapshot:
    """The store's aggregates at one moment, as `StoreCollector` renders them."""

    # (state, action, environment, proposer_kind) -> actions now in that state
    actions: dict[tuple[str, ...], int] = field(default_factory=dict)
    # (action, environment, proposer_kind) -> succeeded actions later rolled back by hand
    succeeded_then_rolled_back: dict[tuple[str, ...], int] = field(default_factory=dict)
    decisions: dict[tuple[str, str], int] = field(default_factory=dict)  # (phase, allow)
    decision_latency: dict[str, Histogram] = field(default_factory=dict)  # by phase, in ms
    blocks: dict[tuple[str, str], int] = field(default_factory=dict)  # (phase, code)
    deadline_exceeded: dict[str, int] = field(default_factory=dict)  # by phase
    outcomes: dict[str, int] = field(default_factory=dict)
    runs_in_progress: int = 0
    stop_conditions: dict[str, int] = field(default_factory=dict)
    rollback: Histogram = field(default_factory=lambda: Histogram(ROLLBACK_BUCKETS))
    rollbacks_unverified: int = 0
    rollbacks_in_progress: int = 0
    workers: dict[str, int] = field(default_factory=lambda: dict.fromkeys(WORKER_STATUSES, 0))


class StoreCollector(Collector):
    """Reads opsgate's metrics from an SQL store on every scrape; never raises on a scrape."""

    def __init__(
        self,
        store: Store,
        *,
        lease: float = 30.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not isinstance(store, SqlStore):
            raise ConfigError(
                "metrics need an SQL store (sqlite:///… or postgresql://…): the in-memory "
                "store lives in one process and has nothing to share"
            )
        self.store = store
        self.lease = lease
        self.clock = clock
        self._lock = threading.Lock()
        self._last_error: str | None = None

    # --- prometheus_client's Collector ------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        """The metric names without samples, so registering never touches the database."""
        return [*render(Snapshot()), _store_up(1)]

    def collect(self) -> Iterable[Metric]:
        """Every metric, or only `opsgate_store_up 0` when the store cannot be read."""
        try:
            snapshot = self.snapshot()
        except (SQLAlchemyError, StoreError) as exc:
            self._failed(exc)
            return [_store_up(0)]
        self._recovered()
        return [*render(snapshot), _store_up(1)]

    def probe(self) -> str | None:
        """None when the store can be read now, else why not (one line)."""
        try:
            self.snapshot()
        except (SQLAlchemyError, StoreError) as exc:
            return str(self._error(exc))
        return None

    # --- reading the store -------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """All aggregates; raises StoreError or SQLAlchemyError when the store fails."""
        snap = Snapshot()
        with self._read() as conn:
            self._read_actions(conn, snap)
            self._read_decisions(conn, snap)
            self._read_executions(conn, snap)
        now = self.clock()
        for info in self.store.list_workers():
            snap.workers[info.status(now, self.lease)] += 1
        return snap

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """One read-only snapshot, so every figure of one scrape agrees with the others."""
        if self.store.dialect == "postgresql":
            engine = self.store.engine.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
            with engine.connect() as conn, conn.begin():
                yield conn
            return
        # `opsgate_read` keeps the store's BEGIN IMMEDIATE (a write lock) away; a deferred
        # BEGIN is a WAL read snapshot that never blocks writers.
        engine = self.store.engine.execution_options(opsgate_read=True)
        with engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")
            try:
                yield conn
            finally:
                conn.rollback()

    def _seconds(self, later: Any, earlier: Any) -> Any:
        if self.store.dialect == "postgresql":
            return cast(func.extract("epoch", later - earlier), Float)
        # SQLite's date functions keep milliseconds; rounding to them drops the float noise
        # of julianday (~40 µs), which could otherwise move a value across a bucket edge.
        return func.round((func.julianday(later) - func.julianday(earlier)) * 86400.0, 3)

    @staticmethod
    def _read_actions(conn: Connection, snap: Snapshot) -> None:
        a, e = actions, executions
        labels = (a.c.action_type, a.c.environment, a.c.proposer_kind)
        by_state = select(a.c.state, *labels, func.count()).group_by(a.c.state, *labels)
        for state, *rest, n in conn.execute(by_state):
            snap.actions[(str(state), *map(_label, rest))] = int(n)
        # Few rows, found through the state index: those that succeeded and moved on.
        moved_on = (
            select(*labels, func.count())
            .select_from(a.join(e, e.c.action_id == a.c.id))
            .where(a.c.state.in_(AFTER_MANUAL_ROLLBACK), e.c.outcome == "succeeded")
            .group_by(*labels)
        )
        for *rest, n in conn.execute(moved_on):
            snap.succeeded_then_rolled_back[tuple(map(_label, rest))] = int(n)

    def _read_decisions(self, conn: Connection, snap: Snapshot) -> None:
        d = decisions
        ms = d.c.duration_ms
        totals = select(
            d.c.phase,
            d.c.allow,
            func.count(),
            func.sum(ms),
            *(func.sum(case((ms <= le, 1), else_=0)) for le in DECISION_BUCKETS_MS),
        ).group_by(d.c.phase, d.c.allow)
        for phase, allow, n, total, *buckets in conn.execute(totals):
            snap.decisions[(str(phase), "true" if allow else "false")] = int(n)
            latency = snap.decision_latency.setdefault(str(phase), Histogram(DECISION_BUCKETS_MS))
            latency.add(buckets, n, total)
        # One decision may carry several codes: it counts once under each (as `report
        # blocks` counts "with code"), a code repeated within it only once.
        if self.store.dialect == "postgresql":
            code = func.jsonb_array_elements_text(d.c.deny_codes).table_valued("value")
        else:
            code = func.json_each(d.c.deny_codes).table_valued("value")
        per_code = (
            select(d.c.phase, code.c.value, func.count(d.c.id.distinct()))
            .select_from(d.join(code, literal(True)))
            .where(d.c.allow.is_(False))
            .group_by(d.c.phase, code.c.value)
        )
        for phase, name, n in conn.execute(per_code):
            snap.blocks[(str(phase), str(name))] = int(n)
        # Decisions the policy engine abandoned at their time budget (see sandbox.py).
        cut = (
            select(d.c.phase, func.count())
            .where(d.c.allow.is_(False), cast(d.c.deny, Text).contains(DEADLINE_EXCEEDED))
            .group_by(d.c.phase)
        )
        for phase, n in conn.execute(cut):
            snap.deadline_exceeded[str(phase)] = int(n)

    def _read_executions(self, conn: Connection, snap: Snapshot) -> None:
        e = executions
        duration = self._seconds(e.c.rollback_verified_at, e.c.rollback_decided_at)
        decided = e.c.rollback_decided_at.is_not(None)
        unverified = and_(decided, e.c.rollback_verified_at.is_(None))
        statement = select(
            e.c.outcome,
            e.c.trigger_name,
            func.count(),
            # A rollback that ended unverified (rollback_failed) never changes again; one
            # still under way may yet verify, so it is a gauge, not part of the counter.
            func.sum(case((and_(unverified, e.c.finished_at.is_not(None)), 1), else_=0)),
            func.sum(case((and_(unverified, e.c.finished_at.is_(None)), 1), else_=0)),
            func.count(e.c.rollback_verified_at),
            func.sum(duration),
            *(func.sum(case((duration <= le, 1), else_=0)) for le in ROLLBACK_BUCKETS),
        ).group_by(e.c.outcome, e.c.trigger_name)
        for outcome, trigger, n, failed, rolling, verified, total, *buckets in conn.execute(
            statement
        ):
            snap.rollbacks_unverified += int(failed or 0)
            snap.rollbacks_in_progress += int(rolling or 0)
            snap.rollback.add(buckets, verified, total)
            if outcome is None:  # still running or verifying: no outcome yet
                snap.runs_in_progress += int(n)
                continue
            snap.outcomes[str(outcome)] = snap.outcomes.get(str(outcome), 0) + int(n)
            if outcome == "stopped":
                name = _label(trigger)
                snap.stop_conditions[name] = snap.stop_conditions.get(name, 0) + int(n)

    # --- errors ------------------------------------------------------------------------

    def _error(self, exc: BaseException) -> StoreError:
        return exc if isinstance(exc, StoreError) else self.store.store_error(exc)

    def _failed(self, exc: BaseException) -> None:
        message = str(self._error(exc))
        with self._lock:
            # Once per outage (or change of error), not once per scrape.
            repeated, self._last_error = message == self._last_error, message
        if repeated:
            log.debug("metrics scrape: %s", message)
        else:
            log.error("metrics scrape failed, exposing opsgate_store_up 0: %s", message)

    def _recovered(self) -> None:
        with self._lock:
            was, self._last_error = self._last_error, None
        if was is not None:
            log.warning("metrics scrape: the store is readable again")


def _label(value: Any) -> str:
    return NONE_LABEL if value is None else str(value)


def _store_up(value: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "opsgate_store_up", "1 if this scrape could read the opsgate store, else 0.", value=value
    )


def render(snap: Snapshot) -> list[Metric]:
    """The metric families of one snapshot (empty families when it holds nothing)."""
    final = CounterMetricFamily(
        "opsgate_actions_total",
        "Actions that reached a final state, by that state. An action that succeeded and "
        "was then rolled back by hand counts under succeeded and under its rollback state.",
        labels=("state", *ACTION_LABELS),
    )
    current = GaugeMetricFamily(
        "opsgate_actions_in_progress",
        "Actions not yet in a final state, by their current state.",
        labels=("state", *ACTION_LABELS),
    )
    reached: dict[tuple[str, ...], int] = defaultdict(int)
    for key, n in sorted(snap.actions.items()):
        if key[0] in FINAL_STATES:
            reached[key] += n
        else:
            current.add_metric(list(key), n)
    for labels, n in snap.succeeded_then_rolled_back.items():
        reached[(S.SUCCEEDED.value, *labels)] += n
    for key, n in sorted(reached.items()):
        final.add_metric(list(key), n)

    decided = CounterMetricFamily(
        "opsgate_policy_decisions_total",
        "Policy decisions, by phase (propose, execute, approval) and result.",
        labels=("phase", "allow"),
    )
    for (phase, allow), n in sorted(snap.decisions.items()):
        decided.add_metric([phase, allow], n)
    blocks = CounterMetricFamily(
        "opsgate_policy_blocks_total",
        "Denied policy decisions by deny code; a decision with several codes counts under "
        "each, so the sum over codes can exceed the denied decisions.",
        labels=("phase", "code"),
    )
    for (phase, code), n in sorted(snap.blocks.items()):
        blocks.add_metric([phase, code], n)
    deadline = CounterMetricFamily(
        "opsgate_policy_deadline_exceeded_total",
        "Policy decisions denied because the evaluation outlived its time budget "
        "(OPSGATE_POLICY_TIMEOUT); also counted under code policy_engine_unavailable.",
        labels=("phase",),
    )
    for phase, n in sorted(snap.deadline_exceeded.items()):
        deadline.add_metric([phase], n)
    latency = HistogramMetricFamily(
        "opsgate_policy_decision_duration_seconds",
        "Time the policy engine took per decision, by phase.",
        labels=("phase",),
    )
    for phase, histogram in sorted(snap.decision_latency.items()):
        latency.add_metric([phase], histogram.samples(scale=1000.0), histogram.total / 1000.0)

    outcomes = CounterMetricFamily(
        "opsgate_verification_outcomes_total",
        "Runs that ended, by verification outcome (succeeded, stopped, failed_verification, "
        "timeout, provider_errors, runner_error, manual).",
        labels=("outcome",),
    )
    for outcome, n in sorted(snap.outcomes.items()):
        outcomes.add_metric([outcome], n)
    running = GaugeMetricFamily(
        "opsgate_runs_in_progress", "Claimed runs without a verification outcome yet."
    )
    running.add_metric([], snap.runs_in_progress)
    stops = CounterMetricFamily(
        "opsgate_stop_condition_activations_total",
        "Runs halted by a stop condition, by the condition's name.",
        labels=("name",),
    )
    for name, n in sorted(snap.stop_conditions.items()):
        stops.add_metric([name], n)

    rollback = HistogramMetricFamily(
        "opsgate_rollback_duration_seconds",
        "Rollback time: from the rollback decision until the rollback verification passed.",
        labels=(),
    )
    rollback.add_metric([], snap.rollback.samples(), snap.rollback.total)
    unverified = CounterMetricFamily(
        "opsgate_rollbacks_unverified_total",
        "Rollbacks that ended without a passing verification (rollback_failed).",
    )
    unverified.add_metric([], snap.rollbacks_unverified)
    rolling = GaugeMetricFamily(
        "opsgate_rollbacks_in_progress", "Rollbacks decided and not yet ended."
    )
    rolling.add_metric([], snap.rollbacks_in_progress)

    workers = GaugeMetricFamily(
        "opsgate_workers",
        "Registered workers by status: live, lapsed (no heartbeat for a lease) or stopped.",
        labels=("status",),
    )
    for status in WORKER_STATUSES:
        workers.add_metric([status], snap.workers.get(status, 0))
    return [
        final, current, decided, blocks, deadline, latency, outcomes, running, stops,
        rollback, unverified, rolling, workers,
    ]  # fmt: skip


# --- serving -----------------------------------------------------------------------------


def serve(
    store: Store, port: int, host: str = "127.0.0.1", *, lease: float = 30.0
) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics from a daemon thread with its own registry; `stop()` ends it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store, lease=lease))
    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc} (choose another port)"
        ) from None


def stop(server: WSGIServer, thread: threading.Thread, timeout: float = 5.0) -> None:
    """Stop serving and free the port."""
    server.shutdown()  # returns once serve_forever has left its loop
    server.server_close()
    thread.join(timeout)


def serve_in_background(
    store: Store, port: int | None, *, lease: float = 30.0, host: str = "127.0.0.1"
) -> Callable[[], None]:
    """Serve metrics next to other work (`opsgate worker --metrics-port`); returns `stop`.

    No port means no server and a stop that does nothing; calling stop twice is fine.
    """
    if port is None:
        return lambda: None
    server, thread = serve(store, port, host, lease=lease)
    stopped = threading.Event()

    def stop_serving() -> None:
        if not stopped.is_set():
            stopped.set()
            stop(server, thread)

    return stop_serving
