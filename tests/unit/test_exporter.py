"""The metrics exporter reads the store: every sample equals a count taken from the records."""

from __future__ import annotations

import itertools
import logging
import random
import socket
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from opsgate.errors import ConfigError
from opsgate.models import TERMINAL_STATES, ActionState, DenyReason, WorkerInfo
from opsgate.reports.exporter import (
    DECISION_BUCKETS_MS,
    ROLLBACK_BUCKETS,
    StoreCollector,
    serve,
    serve_in_background,
    stop,
)
from opsgate.store.sql import SqlStore
from opsgate.testing import MemoryStore
from tests import history

START = datetime(2026, 8, 1, tzinfo=UTC)
END = datetime(2026, 9, 1, tzinfo=UTC)
NOW = datetime(2026, 9, 1, 12, 0, tzinfo=UTC)
LEASE = 30.0
S = ActionState
# Edges included on purpose: a value equal to a bucket's bound belongs in that bucket.
LATENCIES_MS = (0.2, 1.0, 2.5, 3.7, 10.0, 42.0, 2500.0, 4000.0)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def seeded_records() -> list[history.Record]:
    """The seeded history, plus the cases the generator never draws."""
    records = history.generate(1500, seed=11, start=START, end=END)
    rng = random.Random(5)
    for record in records:
        record.decisions = [
            d.model_copy(update={"duration_ms": rng.choice(LATENCIES_MS)}) for d in record.decisions
        ]
    rolled_back = [r for r in records if r.action.state is S.ROLLED_BACK]
    succeeded = [r for r in records if r.action.state is S.SUCCEEDED]
    blocked = [r for r in records if r.action.state is S.BLOCKED]
    # Rollbacks that took exactly a bucket's bound, many: SQLite's julianday difference
    # lands above the bound for ~5% of start times unless the exporter rounds it.
    for record, seconds in zip(rolled_back[:80], itertools.cycle((10, 30, 60, 120)), strict=False):
        assert record.execution is not None and record.execution.rollback_decided_at is not None
        record.execution = record.execution.model_copy(
            update={
                "rollback_verified_at": record.execution.rollback_decided_at
                + timedelta(seconds=seconds)
            }
        )
    # Succeeded, then rolled back by hand: the outcome stays succeeded.
    for record, state in zip(
        succeeded, (S.ROLLED_BACK, S.ROLLBACK_FAILED, S.ROLLING_BACK), strict=False
    ):
        execution = record.execution
        assert execution is not None and execution.run_started_at is not None
        decided = execution.run_started_at + timedelta(minutes=30)
        update: dict[str, object] = {"rollback_decided_at": decided, "finished_at": None}
        if state is S.ROLLED_BACK:
            update |= {"rollback_verified_at": decided + timedelta(seconds=45.5)}
        if state is not S.ROLLING_BACK:
            update["finished_at"] = decided + timedelta(minutes=5)
        record.execution = execution.model_copy(update=update)
        record.action = record.action.model_copy(update={"state": state})
    # Decisions cut at the policy deadline (also counted under their code).
    for record in blocked[1:4]:
        record.decisions[0] = record.decisions[0].model_copy(
            update={
                "deny": (
                    DenyReason(
                        code="policy_engine_unavailable",
                        message="policy engine unavailable: evaluation exceeded its deadline "
                        "(0.5s)",
                    ),
                )
            }
        )
    # A code repeated within one decision counts once.
    first = blocked[0].decisions[0]
    blocked[0].decisions[0] = first.model_copy(
        update={"deny": (DenyReason(code="change_freeze", message="a"),) * 2}
    )
    return records


def collect(collector: StoreCollector) -> Samples:
    samples: Samples = {}
    for family in collector.collect():
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (n, labels), value in samples.items() if n == name}


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


def histogram(
    samples: Samples, name: str, scale: float = 1.0, **fixed: str
) -> tuple[dict[float, float], float, float]:
    """(bucket bound -> cumulative count, count, sum) of one histogram series."""
    buckets = {
        float(dict(key)["le"]) * scale: value
        for key, value in series(samples, f"{name}_bucket").items()
        if set(fixed.items()) <= set(key)
    }
    count = series(samples, f"{name}_count")[labels(**fixed)]
    total = series(samples, f"{name}_sum")[labels(**fixed)]
    return buckets, count, total


def cumulative(values: list[float], bounds: tuple[float, ...]) -> dict[float, float]:
    counts = {bound: float(sum(v <= bound for v in values)) for bound in bounds}
    return {**counts, float("inf"): float(len(values))}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def seeded(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pg_database: Callable[[], str],
) -> Iterator[tuple[SqlStore, list[history.Record]]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('exporter')}/history.db"
    else:
        url = pg_database()
    store = SqlStore(url)
    try:
        store.migrate()
        records = seeded_records()
        history.write(store, records)
        for name, heartbeat, stopped in (
            ("w-live", NOW - timedelta(seconds=5), None),
            ("w-live-2", NOW, None),
            ("w-lapsed", NOW - timedelta(seconds=LEASE + 1), None),
            ("w-stopped", NOW - timedelta(hours=1), NOW - timedelta(minutes=59)),
        ):
            info = WorkerInfo(
                id=name,
                hostname="h",
                pid=1,
                started_at=NOW - timedelta(hours=2),
                heartbeat_at=heartbeat,
                stopped_at=stopped,
            )
            store.register_worker(info)
        yield store, records
    finally:
        store.close()


@pytest.fixture(scope="module")
def scraped(seeded: tuple[SqlStore, list[history.Record]]) -> tuple[Samples, list[history.Record]]:
    store, records = seeded
    return collect(StoreCollector(store, lease=LEASE, clock=lambda: NOW)), records


def test_store_up(scraped: tuple[Samples, list[history.Record]]) -> None:
    samples, _ = scraped
    assert samples[("opsgate_store_up", labels())] == 1


def test_actions_by_final_and_current_state(
    scraped: tuple[Samples, list[history.Record]],
) -> None:
    samples, records = scraped
    final: Counter[frozenset[tuple[str, str]]] = Counter()
    current: Counter[frozenset[tuple[str, str]]] = Counter()
    for record in records:
        action = record.action
        segment = {"action": action.action_type, "environment": action.environment,
                   "proposer_kind": action.proposer.kind}  # fmt: skip
        if action.state in TERMINAL_STATES:
            final[labels(state=action.state.value, **segment)] += 1
        else:
            current[labels(state=action.state.value, **segment)] += 1
        execution = record.execution
        if execution and execution.outcome == "succeeded" and action.state is not S.SUCCEEDED:
            final[labels(state="succeeded", **segment)] += 1
    assert series(samples, "opsgate_actions_total") == final
    assert series(samples, "opsgate_actions_in_progress") == current
    # Never vacuous: the seeded history reaches every kind of end, and some are under way.
    states = {dict(key)["state"] for key in final}
    assert states >= {"blocked", "succeeded", "rolled_back", "rollback_failed", "rejected"}
    assert {dict(key)["state"] for key in current} >= {"pending_approval", "verifying"}


def test_policy_decisions_and_blocks(scraped: tuple[Samples, list[history.Record]]) -> None:
    samples, records = scraped
    decided: Counter[frozenset[tuple[str, str]]] = Counter()
    blocked: Counter[frozenset[tuple[str, str]]] = Counter()
    latencies: dict[str, list[float]] = {}
    for decision in (d for r in records for d in r.decisions):
        decided[labels(phase=decision.phase, allow=str(decision.allow).lower())] += 1
        for code in set(decision.deny_codes):
            blocked[labels(phase=decision.phase, code=code)] += 1
        latencies.setdefault(decision.phase, []).append(decision.duration_ms)
    assert series(samples, "opsgate_policy_decisions_total") == decided
    assert series(samples, "opsgate_policy_blocks_total") == blocked
    cut: Counter[frozenset[tuple[str, str]]] = Counter(
        labels(phase=d.phase)
        for r in records
        for d in r.decisions
        if not d.allow and any("exceeded its deadline" in x.message for x in d.deny)
    )
    assert sum(cut.values()) == 3
    assert series(samples, "opsgate_policy_deadline_exceeded_total") == cut
    assert blocked[labels(phase="propose", code="not_allowlisted")] > 20
    assert set(latencies) == {"propose", "execute"}
    for phase, values in latencies.items():
        buckets, count, total = histogram(
            samples, "opsgate_policy_decision_duration_seconds", scale=1000.0, phase=phase
        )
        assert buckets == cumulative(values, DECISION_BUCKETS_MS)
        assert count == len(values)
        assert total == pytest.approx(sum(values) / 1000.0)


def test_verification_outcomes_and_stop_conditions(
    scraped: tuple[Samples, list[history.Record]],
) -> None:
    samples, records = scraped
    executions = [r.execution for r in records if r.execution is not None]
    outcomes = Counter(labels(outcome=e.outcome) for e in executions if e.outcome is not None)
    stops = Counter(labels(name=str(e.trigger_name)) for e in executions if e.outcome == "stopped")
    assert series(samples, "opsgate_verification_outcomes_total") == outcomes
    assert len(outcomes) >= 6
    assert series(samples, "opsgate_stop_condition_activations_total") == stops
    assert set(stops) == {labels(name="error_spike"), labels(name="latency_spike")}
    in_progress = sum(e.outcome is None for e in executions)
    assert in_progress > 0
    assert samples[("opsgate_runs_in_progress", labels())] == in_progress


def test_rollback_duration_histogram(scraped: tuple[Samples, list[history.Record]]) -> None:
    samples, records = scraped
    durations: list[float] = []
    unverified = rolling = 0
    for execution in (r.execution for r in records if r.execution is not None):
        if execution.rollback_decided_at is None:
            continue
        if execution.rollback_verified_at is not None:
            durations.append(
                (execution.rollback_verified_at - execution.rollback_decided_at).total_seconds()
            )
        elif execution.finished_at is not None:
            unverified += 1
        else:
            rolling += 1
    assert {30.0, 60.0, 120.0, 45.5} <= set(durations)
    buckets, count, total = histogram(samples, "opsgate_rollback_duration_seconds")
    assert buckets == cumulative(durations, ROLLBACK_BUCKETS)
    assert count == len(durations) > 100
    assert total == pytest.approx(sum(durations), abs=0.01)
    assert samples[("opsgate_rollbacks_unverified_total", labels())] == unverified > 0
    assert samples[("opsgate_rollbacks_in_progress", labels())] == rolling == 1


def test_workers_by_status(scraped: tuple[Samples, list[history.Record]]) -> None:
    samples, _ = scraped
    assert series(samples, "opsgate_workers") == {
        labels(status="live"): 2,
        labels(status="lapsed"): 1,
        labels(status="stopped"): 1,
    }


def test_metrics_served_over_http(seeded: tuple[SqlStore, list[history.Record]]) -> None:
    store, records = seeded
    server, thread = serve(store, 0, lease=LEASE)
    port = server.server_port
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        stop(server, thread)
    assert not thread.is_alive()
    assert "opsgate_store_up 1.0" in text
    blocked = sum(
        d.phase == "propose" and "not_allowlisted" in d.deny_codes
        for r in records
        for d in r.decisions
    )
    line = f'opsgate_policy_blocks_total{{code="not_allowlisted",phase="propose"}} {blocked:.1f}'
    assert line in text
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_serve_in_background_stops_once(seeded: tuple[SqlStore, list[history.Record]]) -> None:
    store, _ = seeded
    serve_in_background(store, None)()  # no port: nothing to serve, nothing to stop
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stop_serving = serve_in_background(store, port, lease=LEASE)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
    stop_serving()
    stop_serving()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_port_in_use_is_a_config_error(sqlite_url: str) -> None:
    store = SqlStore(sqlite_url)
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
                serve(store, port)
    finally:
        store.close()


def test_unreadable_store_exposes_store_up_0_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'not-migrated.db'}")
    try:
        collector = StoreCollector(store, lease=LEASE)
        CollectorRegistry().register(collector)  # describing touches no database
        caplog.set_level(logging.DEBUG, logger="opsgate.reports.exporter")
        for _ in range(3):
            assert collect(collector) == {("opsgate_store_up", labels()): 0}
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1  # once per outage, not once per scrape
        assert "no such table" in errors[0].getMessage()
        assert "is the schema migrated?" in (collector.probe() or "")
        store.migrate()
        samples = collect(collector)
        assert samples[("opsgate_store_up", labels())] == 1
        assert series(samples, "opsgate_actions_total") == {}
        assert any("readable again" in r.getMessage() for r in caplog.records)
    finally:
        store.close()


def test_unreachable_postgresql_exposes_store_up_0(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the socket is closed
    store = SqlStore(f"postgresql://opsgate:secret@127.0.0.1:{port}/opsgate")
    try:
        assert collect(StoreCollector(store)) == {("opsgate_store_up", labels()): 0}
    finally:
        store.close()
    assert "secret" not in caplog.text
    assert any(r.levelno == logging.ERROR for r in caplog.records)


def test_memory_store_is_refused() -> None:
    with pytest.raises(ConfigError, match="need an SQL store"):
        StoreCollector(MemoryStore())
