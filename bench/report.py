"""Report speed over 1,000,000 historical actions, in SQLite and in PostgreSQL.

Seeds the history (tests/history.py's distributions, bulk-inserted through the store's
row mappers), then times `report verification --by incident_class` and
`report blocks --by code` as the CLI builds them (current window plus the previous
one, and the search for the segment that moved), and a bare `SELECT count(*)` over the
actions table in the same run. Target: each report under 3 s and ratio <= 20.

    python bench/report.py [--actions 1000000] [--only sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._rig import print_facts  # noqa: E402
from opsgate.reports.build import blocks_report, verification_report  # noqa: E402
from opsgate.reports.queries import ReportQueries, Window  # noqa: E402
from opsgate.store import open_store  # noqa: E402
from opsgate.store.sql import (  # noqa: E402
    SqlStore,
    action_to_row,
    decision_to_row,
    execution_to_row,
    segment_key,
)
from opsgate.store.tables import actions, decisions, executions, segments  # noqa: E402
from tests import history  # noqa: E402

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
CHUNK = 50_000


def seed(store: SqlStore, n: int, now: datetime) -> float:
    """Bulk-insert n actions spread over 180 days; returns seconds taken."""
    started = time.perf_counter()
    start = now - timedelta(days=180)
    ids: dict[tuple[str, ...], int] = {}  # the segment dimension, as the store fills it
    with store.engine.begin() as conn:
        for offset in range(0, n, CHUNK):
            size = min(CHUNK, n - offset)
            records = history.generate(size, seed=offset, start=start, end=now)
            rows_a, rows_d, rows_e = [], [], []
            for record in records:
                # ids unique across chunks
                suffix = f"-{offset}"
                action = record.action.model_copy(update={"id": record.action.id + suffix})
                key = segment_key(action)
                if tuple(key.values()) not in ids:
                    inserted = conn.execute(insert(segments).returning(segments.c.id), key)
                    ids[tuple(key.values())] = int(inserted.scalar_one())
                segment_id = ids[tuple(key.values())]
                rows_a.append({**action_to_row(action), "segment_id": segment_id})
                for decision in record.decisions:
                    row = decision_to_row(
                        decision.model_copy(
                            update={"id": decision.id + suffix, "action_id": action.id}
                        )
                    )
                    rows_d.append({**row, "segment_id": segment_id})
                if record.execution is not None:
                    row = execution_to_row(
                        record.execution.model_copy(
                            update={
                                "action_id": action.id,
                                "target": record.execution.target + suffix,
                            }
                        )
                    )
                    rows_e.append({**row, "segment_id": segment_id})
            conn.execute(insert(actions), rows_a)
            conn.execute(insert(decisions), rows_d)
            conn.execute(insert(executions), rows_e)
            print(f"  seeded {offset + size:,}", end="\r", flush=True)
    if store.dialect == "postgresql":
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    else:
        with store.engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    return time.perf_counter() - started


REPEAT = 3
SPREAD: dict[str, list[float]] = {}


def timed(work: Callable[[], object], label: str, repeat: int = REPEAT) -> float:
    """Best of `repeat` (warm cache: what a reader re-running a report sees); every run
    is kept in SPREAD for the spread line."""
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        runs.append(time.perf_counter() - started)
    SPREAD[label] = runs
    return min(runs)


def measure(name: str, url: str, n: int) -> dict[str, float]:
    store = open_store(url)
    assert isinstance(store, SqlStore)
    store.migrate()
    now = datetime.now(UTC)
    seconds = seed(store, n, now)
    print(f"{name}: seeded {n:,} actions in {seconds:.0f} s" + " " * 20)
    queries = ReportQueries(store)
    window = Window(now - timedelta(days=90), now)
    bare = timed(queries.count_actions, f"{name} count(*)")
    verification = timed(
        lambda: verification_report(queries, window, "incident_class", {}),
        f"{name} verification",
    )
    blocks = timed(lambda: blocks_report(queries, window, None, {}), f"{name} blocks")
    store.close()
    return {"count": bare, "verification": verification, "blocks": blocks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=1_000_000)
    parser.add_argument("--only", choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    print_facts(
        "report",
        f"each query {REPEAT} times on a warm cache, best shown",
        postgres_url=None if args.only == "sqlite" else PG_ADMIN,
    )
    results: dict[str, dict[str, float]] = {}
    if args.only in (None, "sqlite"):
        with tempfile.TemporaryDirectory() as directory:
            results["sqlite"] = measure("sqlite", f"sqlite:///{directory}/bench.db", args.actions)
    if args.only in (None, "postgresql"):
        name = f"opsgate_bench_report_{int(time.time())}"
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
            results["postgresql"] = measure("postgresql", url, args.actions)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    print(f"\n{args.actions:,} actions, window 90 days (+ the previous 90 for comparison)")
    print(
        f"{'store':<11} {'count(*)':>9} {'verification':>13} {'ratio':>6} "
        f"{'blocks':>8} {'ratio':>6}"
    )
    met = True
    for store_name, r in results.items():
        rv, rb = r["verification"] / r["count"], r["blocks"] / r["count"]
        print(
            f"{store_name:<11} {r['count'] * 1000:8.1f}ms {r['verification']:12.2f}s {rv:6.1f}"
            f" {r['blocks']:7.2f}s {rb:6.1f}"
        )
        met &= r["verification"] < 3 and r["blocks"] < 3 and rv <= 20 and rb <= 20
    print("every run (s): " + "; ".join(
        f"{label} " + "/".join(f"{x:.3f}" for x in runs) for label, runs in SPREAD.items()
    ))  # fmt: skip
    print(f"target: each report < 3 s and ratio <= 20: {'met' if met else 'missed'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
