"""Propose N actions through the Python API into SQLite (WAL, synchronous=FULL).

Prints the per-proposal median and p99 and, from the same run, the ratio of the
median to the bare cost of its parts: one compiled evaluation in process (regopy, or
OPA's Go evaluator with --engine opa-embedded) plus one durable SQLite commit.
Target: ratio <= 3, p99 <= 5 ms.

The engine evaluates in a worker process under a deadline; the run also prints that
isolation's cost per decision (isolated evaluation minus the in-process one).

Every decision reads its proposer's track record. Before timing, the proposer is given a
history of --history actions (default 100,000; bench/track_record.py's seeding), so the
figures are those of a proposer with that history; the run also times the record's read
alone, in a transaction as a proposal reads it: what the history adds to a decision.
Target: <= 1 ms at the median.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._rig import percentile, print_facts, spread  # noqa: E402
from bench.track_record import seed  # noqa: E402
from opsgate.catalog import load_catalog  # noqa: E402
from opsgate.gate import Gate  # noqa: E402
from opsgate.models import Identity  # noqa: E402
from opsgate.policies.differential import InProcess  # noqa: E402
from opsgate.policies.embedded import EmbeddedEngine, OpaEmbeddedEngine  # noqa: E402
from opsgate.policies.engine import DECISION_RULE  # noqa: E402
from opsgate.shared import utcnow  # noqa: E402
from opsgate.store import open_store  # noqa: E402
from opsgate.trust import track_record  # noqa: E402

__all__ = ["document", "percentile"]  # bench/api.py reuses both


def document(i: int) -> dict[str, object]:
    return {
        "action": "scale_deployment",
        "target": f"svc-{i % 50}",
        "environment": "prod",
        "params": {"deployment": f"svc-{i % 50}", "replicas": 2 + i % 40},
        "reason": "p99 latency over SLO",
        "incident": {"id": f"INC-{i}", "severity": "sev2", "class": "capacity", "tier": "standard"},
    }


def in_process_eval_ms(evaluator: str, sample_input: dict[str, object], n: int) -> list[float]:
    """The bundle compiled once and queried in this process: no deadline, no isolation."""
    engine = InProcess(evaluator, ROOT / "policies")
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        engine.evaluate(DECISION_RULE, sample_input)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (a policy sandbox worker)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bare_commit_ms(directory: Path, n: int) -> list[float]:
    """One INSERT and a durable commit, the floor under any stored proposal."""
    conn = sqlite3.connect(directory / "bare.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY, body TEXT)")
    samples = []
    body = "x" * 2000
    for i in range(n):
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (?, ?)", (f"id-{i}", body))
        conn.execute("COMMIT")
        samples.append((time.perf_counter() - start) * 1000)
    conn.close()
    return samples


def track_record_reads(store: Any, proposer: Identity, n: int) -> list[float]:
    """The proposer's record read as a decision reads it: in a transaction."""
    samples = []
    with store.transaction() as tx:
        for _ in range(n):
            start = time.perf_counter()
            track_record(tx, proposer.id, "scale_deployment", "prod", utcnow())
            samples.append((time.perf_counter() - start) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--history", type=int, default=100_000)
    parser.add_argument(
        "--engine",
        choices=["embedded", "opa-embedded"],
        default="embedded",
        help="regopy (default) or OPA's Go evaluator, both in worker processes",
    )
    args = parser.parse_args()
    print_facts(
        "propose",
        f"{args.n} proposals after 50 warm-up ones by a proposer with {args.history:,} "
        "actions of history; 2,000 of each bare part and track-record reads",
    )
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        store = open_store(f"sqlite:///{directory / 'bench.db'}")
        store.migrate()
        kind = OpaEmbeddedEngine if args.engine == "opa-embedded" else EmbeddedEngine
        engine = kind(ROOT / "policies")
        gate = Gate(store=store, catalog=load_catalog(ROOT / "catalog"), engine=engine)
        alice = Identity(id="alice", kind="human")
        if args.history:
            seconds = seed(store, args.history, utcnow(), alice)
            print(f"propose: seeded {args.history:,} actions of alice in {seconds:.0f} s")
        for i in range(50):  # warm up caches and the interpreter
            gate.propose(document(i), alice)

        pids = engine._pool.pids()
        cpu_before = time.process_time(), sum(process_cpu(pid) for pid in pids)
        latencies = []
        for i in range(args.n):
            start = time.perf_counter()
            outcome = gate.propose(document(i), alice)
            latencies.append((time.perf_counter() - start) * 1000)
            assert outcome.action.state.value == "pending_approval", outcome.decision.deny_codes

        # CPU per proposal does not stretch with the machine's load as wall time does.
        own_cpu = (time.process_time() - cpu_before[0]) * 1000 / args.n
        sandbox_cpu = (sum(process_cpu(p) for p in pids) - cpu_before[1]) * 1000 / args.n
        sample_input = store.decisions_for(outcome.action.id)[0].input
        evals = []
        for _ in range(2000):
            start = time.perf_counter()
            engine.evaluate(DECISION_RULE, sample_input)
            evals.append((time.perf_counter() - start) * 1000)
        bare_evals = in_process_eval_ms(engine.evaluator, sample_input, 2000)
        commits = bare_commit_ms(directory, 2000)
        reads = track_record_reads(store, alice, 2000)
        worker_rss = [rss_mib(pid) for pid in engine._pool.pids()]
        store.close()
        engine.close()

    median = statistics.median(latencies)
    bare = statistics.median(bare_evals) + statistics.median(commits)
    isolated = statistics.median(evals)
    print(f"engine:                   {args.engine}")
    print(f"proposals:                {args.n} into SQLite (WAL, synchronous=FULL)")
    print(f"propose median:           {median:.3f} ms")
    print(f"propose p99:              {percentile(latencies, 0.99):.3f} ms   (target <= 5 ms)")
    print(f"propose spread:           {spread(latencies, 'ms', digits=3)}")
    print(
        f"CPU per proposal:         {own_cpu:.2f} ms in this process + {sandbox_cpu:.2f} ms "
        "in the policy sandbox"
    )
    print(f"bare evaluation:          {statistics.median(bare_evals):.3f} ms (median, in process)")
    print(f"isolated evaluation:      {isolated:.3f} ms (median, worker process + deadline)")
    print(f"worker processes:         {len(worker_rss)}, RSS {sum(worker_rss):.0f} MiB in all")
    print(
        f"isolation overhead:       {isolated - statistics.median(bare_evals):.3f} ms per decision"
    )
    print(f"bare durable commit:      {statistics.median(commits):.3f} ms (median)")
    print(f"bare evaluation spread:   {spread(bare_evals, 'ms', digits=3)}")
    print(f"bare commit spread:       {spread(commits, 'ms', digits=3)}")
    print(f"ratio median / bare:      {median / bare:.2f}   (target <= 3)")
    print(
        f"track record read:        {statistics.median(reads):.3f} ms (median; "
        f"{args.history:,} actions of history; target <= 1 ms)"
    )
    print(f"track record spread:      {spread(reads, 'ms', digits=3)}")
    # The proposer's track record is read inside every decision and grows with each
    # proposal: a per-proposal cost that grows with the history shows here.
    tenth = max(len(latencies) // 10, 1)
    first, last = statistics.median(latencies[:tenth]), statistics.median(latencies[-tenth:])
    print(
        f"first / last tenth:       {first:.3f} ms / {last:.3f} ms (median; "
        f"{last / first:.2f}x over the run)"
    )
    print(f"throughput:               {args.n / (sum(latencies) / 1000):.0f} proposals/s")


if __name__ == "__main__":
    main()
