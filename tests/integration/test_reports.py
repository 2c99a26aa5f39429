"""Report figures over a seeded history equal the ground truth, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from opsgate.reports.queries import CAUSES, SEGMENTS, ReportQueries, Window
from opsgate.store import open_store
from opsgate.store.sql import SqlStore
from tests import history

START = datetime(2026, 8, 1, tzinfo=UTC)
END = datetime(2026, 11, 1, tzinfo=UTC)
N = 3000
BYS = [None, *SEGMENTS]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def seeded(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pg_database: Callable[[], str],
) -> Iterator[tuple[ReportQueries, list[history.Record]]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('reports')}/history.db"
    else:
        url = pg_database()
    store = open_store(url)
    assert isinstance(store, SqlStore)
    store.migrate()
    records = history.generate(N, seed=7, start=START, end=END)
    history.write(store, records)
    yield ReportQueries(store), records
    store.close()


WINDOWS = [
    Window(START, END),
    Window(START + timedelta(days=30), START + timedelta(days=61)),  # a cut through the middle
]


@pytest.mark.parametrize("by", BYS)
@pytest.mark.parametrize("window", WINDOWS, ids=["all", "middle"])
def test_verification_figures(
    seeded: tuple[ReportQueries, list[history.Record]], by: str | None, window: Window
) -> None:
    queries, records = seeded
    truth = history.truth_verification(records, window.since, window.until, by)
    assert sum(t["started"] for t in truth.values()) > 300  # never vacuous
    got = {row.segment: row for row in queries.verification(window, by)}
    assert set(got) == set(truth)
    for segment, expected in truth.items():
        row = got[segment]
        assert (row.started, row.finished, row.succeeded, row.in_progress) == (
            expected["started"],
            expected["finished"],
            expected["succeeded"],
            expected["in_progress"],
        )
        assert {c: row.causes[c] for c in CAUSES if row.causes[c]} == dict(expected["causes"])
        assert row.stop_conditions == dict(expected["stops"])
        assert row.pass_rate == pytest.approx(expected["succeeded"] / expected["finished"])


@pytest.mark.parametrize("by", BYS)
@pytest.mark.parametrize("window", WINDOWS, ids=["all", "middle"])
def test_rollback_times(
    seeded: tuple[ReportQueries, list[history.Record]], by: str | None, window: Window
) -> None:
    queries, records = seeded
    truth = history.truth_rollbacks(records, window.since, window.until, by)
    assert sum(t["decided"] for t in truth.values()) > 100
    got = {row.segment: row for row in queries.rollbacks(window, by)}
    assert set(got) == set(truth)
    for segment, expected in truth.items():
        row = got[segment]
        durations = expected["durations"]
        assert row.decided == expected["decided"]
        assert row.verified == len(durations)
        assert row.never_verified == expected["decided"] - len(durations)
        assert row.p50 == pytest.approx(history.percentile(durations, 0.5), abs=1e-3)
        assert row.p90 == pytest.approx(history.percentile(durations, 0.9), abs=1e-3)
        assert row.max == pytest.approx(max(durations) if durations else None, abs=1e-3)


@pytest.mark.parametrize("phase", ["propose", "execute"])
@pytest.mark.parametrize("by", BYS)
def test_block_rates_by_code_both_ways(
    seeded: tuple[ReportQueries, list[history.Record]], by: str | None, phase: str
) -> None:
    queries, records = seeded
    window = WINDOWS[0]
    truth = history.truth_blocks(records, window.since, window.until, by, phase)
    assert sum(t["blocked"] for t in truth.values()) > 100
    got = {row.segment: row for row in queries.blocks(window, by, phase=phase)}
    assert set(got) == set(truth)
    for segment, expected in truth.items():
        row = got[segment]
        assert (row.decided, row.blocked) == (expected["decided"], expected["blocked"])
        assert row.with_code == dict(expected["with_code"])
        assert row.first_code == dict(expected["first_code"])
        assert sum(row.first_code.values()) == row.blocked


@pytest.mark.parametrize("by", BYS)
def test_time_to_approval(
    seeded: tuple[ReportQueries, list[history.Record]], by: str | None
) -> None:
    queries, records = seeded
    window = WINDOWS[1]
    truth = history.truth_approvals(records, window.since, window.until, by)
    assert sum(t["approved"] for t in truth.values()) > 300
    got = {row.segment: row for row in queries.approvals(window, by)}
    assert set(got) == set(truth)
    for segment, expected in truth.items():
        row = got[segment]
        assert (row.waited, row.approved, row.rejected, row.expired) == (
            expected["waited"],
            expected["approved"],
            expected["rejected"],
            expected["expired"],
        )
        assert row.p50 == pytest.approx(history.percentile(expected["waits"], 0.5), abs=1e-3)
        assert row.p90 == pytest.approx(history.percentile(expected["waits"], 0.9), abs=1e-3)


def test_filters_narrow_every_figure(seeded: tuple[ReportQueries, list[history.Record]]) -> None:
    queries, records = seeded
    window = WINDOWS[0]
    where = {"incident_class": "deploy-related", "severity": "sev2", "tier": "critical"}
    chosen = [
        r
        for r in records
        if r.segments["incident_class"] == "deploy-related"
        and r.segments["severity"] == "sev2"
        and r.segments["tier"] == "critical"
    ]
    truth = history.truth_verification(chosen, window.since, window.until)["all"]
    [row] = queries.verification(window, None, where)
    assert (row.started, row.succeeded) == (truth["started"], truth["succeeded"])
    with pytest.raises(ValueError, match="unknown filter"):
        queries.verification(window, None, {"colour": "red"})
