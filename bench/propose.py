"""Propose N actions through the Python API into SQLite (WAL, synchronous=FULL).

Prints the per-proposal median and p99 and, from the same run, the ratio of the
median to the bare cost of its parts: one compiled regopy evaluation in process plus
one durable SQLite commit. Target: ratio <= 3, p99 <= 5 ms.

The engine evaluates in a worker process under a deadline; the run also prints that
isolation's cost per decision (isolated evaluation minus the in-process one).
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from opsgate.catalog import load_catalog
from opsgate.gate import Gate
from opsgate.models import Identity
from opsgate.policies.embedded import EmbeddedEngine, _new_interpreter
from opsgate.policies.engine import APPROVAL_RULE, DECISION_RULE, bundle_files, load_bundle_data
from opsgate.store import open_store

ROOT = Path(__file__).resolve().parents[1]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def document(i: int) -> dict[str, object]:
    return {
        "action": "scale_deployment",
        "target": f"svc-{i % 50}",
        "environment": "prod",
        "params": {"deployment": f"svc-{i % 50}", "replicas": 2 + i % 40},
        "reason": "p99 latency over SLO",
        "incident": {"id": f"INC-{i}", "severity": "sev2", "class": "capacity", "tier": "standard"},
    }


def in_process_eval_ms(sample_input: dict[str, object], n: int) -> list[float]:
    """The bundle compiled once and queried in this process: no deadline, no isolation."""
    interp = _new_interpreter()
    interp.add_data(load_bundle_data(ROOT / "policies"))
    for path in bundle_files(ROOT / "policies"):
        if path.suffix == ".rego":
            interp.add_module(path.name, path.read_text(encoding="utf-8"))
    bundle = interp.build(None, [DECISION_RULE, APPROVAL_RULE])
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        interp.set_input(sample_input)
        output = interp.query_bundle_entrypoint(bundle, DECISION_RULE)
        assert output.ok()
        str(output)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        store = open_store(f"sqlite:///{directory / 'bench.db'}")
        store.migrate()
        engine = EmbeddedEngine(ROOT / "policies")
        gate = Gate(store=store, catalog=load_catalog(ROOT / "catalog"), engine=engine)
        alice = Identity(id="alice", kind="human")
        for i in range(50):  # warm up caches and the interpreter
            gate.propose(document(i), alice)

        latencies = []
        for i in range(args.n):
            start = time.perf_counter()
            outcome = gate.propose(document(i), alice)
            latencies.append((time.perf_counter() - start) * 1000)
            assert outcome.action.state.value == "pending_approval", outcome.decision.deny_codes

        sample_input = store.decisions_for(outcome.action.id)[0].input
        evals = []
        for _ in range(2000):
            start = time.perf_counter()
            engine.evaluate(DECISION_RULE, sample_input)
            evals.append((time.perf_counter() - start) * 1000)
        bare_evals = in_process_eval_ms(sample_input, 2000)
        commits = bare_commit_ms(directory, 2000)
        store.close()
        engine.close()

    median = statistics.median(latencies)
    bare = statistics.median(bare_evals) + statistics.median(commits)
    isolated = statistics.median(evals)
    print(f"proposals:                {args.n} into SQLite (WAL, synchronous=FULL)")
    print(f"propose median:           {median:.3f} ms")
    print(f"propose p99:              {percentile(latencies, 0.99):.3f} ms   (target <= 5 ms)")
    print(f"bare regopy evaluation:   {statistics.median(bare_evals):.3f} ms (median, in process)")
    print(f"isolated evaluation:      {isolated:.3f} ms (median, worker process + deadline)")
    print(
        f"isolation overhead:       {isolated - statistics.median(bare_evals):.3f} ms per decision"
    )
    print(f"bare durable commit:      {statistics.median(commits):.3f} ms (median)")
    print(f"ratio median / bare:      {median / bare:.2f}   (target <= 3)")
    print(f"throughput:               {args.n / (sum(latencies) / 1000):.0f} proposals/s")


if __name__ == "__main__":
    main()
