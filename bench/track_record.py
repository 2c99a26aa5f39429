"""The track record's cost per decision, with 100,000 actions of history for the proposer.

Seeds the history (tests/history.py's distributions, every action by one agent, spread
over 180 days, bulk-inserted through the store's row mappers), counts the store's
track-record summary from those rows (the functions the store and the migration use), then
times what every decision adds: reading and cutting `proposer.track_record`
(opsgate.trust.track_record, as Gate.evaluate calls it, from the summary), warm, many
times; and, for the ratio, the same record counted from the facts with the reports'
queries (what a replay reads). Target: <= 1 ms at the median.

    python bench/track_record.py [--actions 100000] [--only sqlite|postgresql] [--calls 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._rig import print_facts, spread  # noqa: E402
from opsgate.models import Identity  # noqa: E402
from opsgate.store import open_store  # noqa: E402
from opsgate.store.sql import (  # noqa: E402
    SqlStore,
    action_to_row,
    decision_to_row,
    execution_to_row,
    segment_key,
)
from opsgate.store.summary_sql import rebuild  # noqa: E402
from opsgate.store.tables import actions, decisions, executions, segments  # noqa: E402
from opsgate.trust import track_record  # noqa: E402
from tests import history  # noqa: E402

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
CHUNK = 50_000
PROPOSER = Identity(id="bench-agent", kind="agent")


def seed(store: SqlStore, n: int, now: datetime, proposer: Identity = PROPOSER) -> float:
    started = time.perf_counter()
    start = now - timedelta(days=180)
    ids: dict[tuple[str, ...], int] = {}
    with store.engine.begin() as conn:
        for offset in range(0, n, CHUNK):
            size = min(CHUNK, n - offset)
            rows_a, rows_d, rows_e = [], [], []
            for record in history.generate(size, seed=offset, start=start, end=now):
                suffix = f"-{offset}"
                action = record.action.model_copy(
                    update={"id": record.action.id + suffix, "proposer": proposer}
                )
                key = segment_key(action)
                if tuple(key.values()) not in ids:
                    inserted = conn.execute(insert(segments).returning(segments.c.id), key)
                    ids[tuple(key.values())] = int(inserted.scalar_one())
                segment_id = ids[tuple(key.values())]
                rows_a.append({**action_to_row(action), "segment_id": segment_id})
                for decision in record.decisions:
                    update = {"id": decision.id + suffix, "action_id": action.id}
                    rows_d.append(
                        {
                            **decision_to_row(decision.model_copy(update=update)),
                            "segment_id": segment_id,
                        }
                    )
                if record.execution is not None:
                    update = {"action_id": action.id, "target": record.execution.target + suffix}
                    row = execution_to_row(record.execution.model_copy(update=update))
                    rows_e.append({**row, "segment_id": segment_id})
            conn.execute(insert(actions), rows_a)
            conn.execute(insert(decisions), rows_d)
            conn.execute(insert(executions), rows_e)
        # The rows went around the store: count its track-record summary from them, with
        # the functions the store uses as it writes (and the migration's backfill).
        rebuild(conn, store.dialect)
    if store.dialect == "postgresql":
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    else:
        with store.engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    return time.perf_counter() - started


def measure(name: str, url: str, n: int, calls: int) -> dict[str, list[float]]:
    store = open_store(url)
    assert isinstance(store, SqlStore)
    store.migrate()
    now = datetime.now(UTC)
    seconds = seed(store, n, now)
    print(f"{name}: seeded {n:,} actions of {PROPOSER.id} in {seconds:.0f} s", flush=True)
    types = sorted({t for (t,) in store._all(text("SELECT DISTINCT action_type FROM actions"))})
    samples: dict[str, list[float]] = {"summary": [], "reports": []}
    with store.transaction() as tx:  # as a decision reads it: inside its transaction
        for path, as_of, count in (("summary", False, calls), ("reports", True, calls // 10)):
            for i in range(count + 5):
                started = time.perf_counter()
                record = track_record(
                    tx, PROPOSER.id, types[i % len(types)], "prod", now, as_of=as_of
                )
                if i >= 5:  # warm-up
                    samples[path].append((time.perf_counter() - started) * 1000)
            overall = record.scopes["overall"]
            print(
                f"{name}: {path}: {overall.proposals:,} proposals, "
                f"{overall.executed:,} runs in the window"
            )
    store.close()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--only", choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    print_facts(
        "track_record",
        f"one seeding per store; {args.calls} warm reads from the summary, "
        f"{args.calls // 10} counted from the facts (the reports' queries)",
        postgres_url=PG_ADMIN if args.only != "sqlite" else None,
    )
    results: dict[str, dict[str, list[float]]] = {}
    if args.only in (None, "sqlite"):
        with tempfile.TemporaryDirectory() as directory:
            url = f"sqlite:///{directory}/bench.db"
            results["sqlite"] = measure("sqlite", url, args.actions, args.calls)
    if args.only in (None, "postgresql"):
        name = f"opsgate_bench_trust_{int(time.time())}"
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
            results["postgresql"] = measure("postgresql", url, args.actions, args.calls)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    print(f"\ntrack record per decision, {args.actions:,} actions of history")
    met = True
    for store_name, paths in results.items():
        for path, samples in paths.items():
            print(f"{store_name:<11} {path:<8} {spread(samples)}")
        summary = statistics.median(paths["summary"])
        reports = statistics.median(paths["reports"])
        print(
            f"{store_name:<11} summary / counted from the facts, medians: "
            f"{summary:.3f} / {reports:.1f} ms (x{reports / summary:.0f})"
        )
        met &= summary <= 1.0
    print(f"target: <= 1 ms at the median (summary): {'met' if met else 'missed'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
