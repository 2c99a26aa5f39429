"""A harmful change must never verify on samples from before it (post-change evidence).

Each run proposes, approves and runs one action on a fresh, healthy service (error ratio
0, scraped every 1 s by a real Prometheus); its `run` step is a real process that sets
the ratio to 0.1: worse, but under the stop condition's halt range, so only the signal
can catch it. The signal is the error ratio over a `--window` range (default 4s) with a
`--hold` shorter than the window (default 1s) and failure_limit 0: exactly the case in
which the first intervals after `run` read mostly healthy samples. Under the old rule
those passed for the whole hold and the change verified; under the post-change evidence
rule they are stored as pre-change and the first counted measurement fails.

`--load N` keeps N busy-looping processes running for the whole bench (a loaded CI
machine), so tick, scrape and query delays vary. Prints one row per run and the counts.
Target: every run rolled back (failed_verification), no counted measurement ever read a
pre-change sample (each counted value is the change's 0.1), in every round.
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._rig import (  # noqa: E402
    child_pythonpath,
    error_ratio,
    fault_and_prometheus,
    make_gate,
    pid_tag,
    print_facts,
    propose_approved,
    sigterm_as_interrupt,
    wait_for_values,
    write_catalog,
)
from opsgate.executor.executor import Executor  # noqa: E402
from opsgate.models import ActionState  # noqa: E402
from opsgate.store import open_store  # noqa: E402
from opsgate.verification.prometheus import PrometheusProvider  # noqa: E402

ACTION = "scale_deployment"  # allowlisted in staging by the default bundle
HARMFUL_RATIO = 0.1
SET = [sys.executable, "-m", "tests.integration.fault_service", "set"]
SET += ["--url", "{fault_url}", "--service", "{target}", "--ratio"]


def action_type(window: str, hold: float) -> dict[str, Any]:
    query = error_ratio("{target}", window)
    return {
        "name": ACTION,
        "risk": "medium",
        "params": {"fault_url": {"type": "string", "pattern": r"^http://127\.0\.0\.1:[0-9]+$"}},
        "run": {"argv": [*SET, f"{HARMFUL_RATIO:g}"], "timeout": "20s"},
        "undo": {"argv": [*SET, "0"], "timeout": "20s"},
        "verification": {
            "interval": "1s",
            "hold": f"{hold:g}s",
            "timeout": "30s",
            "signals": [{"name": "error_rate", "query": query, "pass": {"max": 0.05}}],
            "stop_conditions": [{"name": "error_spike", "query": query, "halt": {"min": 0.3}}],
            "failure_limit": 0,
            "error_limit": 3,
        },
    }


def leading_passes(measurements: list[Any]) -> int:
    """Passes in a row from the start of verification: what the old rule counted."""
    count = 0
    for measurement in measurements:
        if measurement.outcome != "pass":
            break
        count += 1
    return count


def burn(stop_at: float) -> None:
    # The parent's SIGTERM handler raises KeyboardInterrupt; a burner just ends.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while time.time() < stop_at:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=5, help="actions verifying at once")
    parser.add_argument("--window", default="4s")
    parser.add_argument("--hold", type=float, default=1.0)
    parser.add_argument("--load", type=int, default=2, help="busy-looping processes")
    args = parser.parse_args()
    sigterm_as_interrupt()
    child_pythonpath()
    services = [f"evidence-{pid_tag()}-{i}" for i in range(args.runs)]
    query = error_ratio("{target}", args.window)
    started = time.monotonic()
    print_facts("evidence", f"{args.runs} runs, {args.parallel} at a time")
    print(
        f"{args.runs} runs ({args.parallel} at a time), signal {args.window} window, hold "
        f"{args.hold:g}s, failure_limit 0, run sets the error ratio 0 -> {HARMFUL_RATIO:g}; "
        f"{args.load} busy-looping processes beside it"
    )
    burners = [
        multiprocessing.Process(target=burn, args=(time.time() + 3600,), daemon=True)
        for _ in range(args.load)
    ]
    for process in burners:
        process.start()
    rows: list[tuple[str, str, int, int, int, float | None]] = []
    try:
        with (
            tempfile.TemporaryDirectory(prefix="opsgate-evidence-") as tmp,
            fault_and_prometheus(services, Path(tmp)) as (faults, prometheus),
        ):
            wait_for_values(prometheus, [query.replace("{target}", s) for s in services], 60)
            store = open_store(f"sqlite:///{Path(tmp) / 'opsgate.db'}")
            store.migrate()
            catalog = write_catalog(Path(tmp) / "catalog", [action_type(args.window, args.hold)])
            gate = make_gate(store, catalog)
            provider = PrometheusProvider(prometheus.url, timeout=2.0)
            executor = Executor(
                store,
                gate,
                provider,
                worker_id="bench-evidence",
                concurrency=args.parallel,
            )
            executor.start()
            try:
                print(f"scrape interval Prometheus reports: {provider.scrape_interval():g}s\n")
                header = (
                    f"{'run':>3}  {'outcome':<34}  {'pre-change':>10}  "
                    f"{'passes first':>13}  {'counted':>7}  {'counted values'}"
                )
                print(header)
                print("-" * len(header))
                for first in range(0, args.runs, args.parallel):
                    batch = services[first : first + args.parallel]
                    ids = []
                    for service in batch:
                        action_id = propose_approved(
                            gate, ACTION, service, {"fault_url": faults.url}, "evidence bench"
                        )
                        claimed = executor.claim(action_id)
                        assert claimed is not None and claimed.state is ActionState.EXECUTING
                        executor.launch(action_id)
                        ids.append(action_id)
                    if not executor.wait_idle(timeout=120):
                        raise SystemExit("a batch did not finish in 120 s")
                    for offset, action_id in enumerate(ids, start=first + 1):
                        action = store.get_action(action_id)
                        execution = store.get_execution(action_id)
                        assert action is not None and execution is not None
                        verify = [
                            m
                            for m in store.measurements_for(action_id)
                            if m.phase == "verify" and m.kind == "signal"
                        ]
                        pre = [m for m in verify if m.not_counted == "pre_change"]
                        counted = [m for m in verify if m.not_counted is None]
                        values = [m.value for m in counted if m.value is not None]
                        outcome = f"{execution.outcome}/{action.state.value}"
                        worst = max((abs(v - HARMFUL_RATIO) for v in values), default=None)
                        rows.append(
                            (
                                outcome,
                                action.state.value,
                                len(pre),
                                leading_passes(pre),
                                len(counted),
                                worst,
                            )
                        )
                        shown = " ".join(f"{v:.3f}" for v in values)
                        print(
                            f"{offset:>3}  {outcome:<34}  {len(pre):>10}  "
                            f"{rows[-1][3]:>13}  {len(counted):>7}  {shown}",
                            flush=True,
                        )
            finally:
                executor.close()
                provider.close()
                store.close()
    finally:
        for process in burners:
            process.terminate()
            process.join(5)

    rolled_back = sum(1 for r in rows if r[0] == "failed_verification/rolled_back")
    # Under the old rule, a run whose first `hold/interval + 1` measurements passed
    # would have verified the harmful change.
    needed = int(args.hold) + 1
    old_rule_passes = sum(1 for r in rows if r[3] >= needed)
    deviations = [r[5] for r in rows if r[5] is not None]
    print()
    print(f"runs {len(rows)}: rolled back by failed_verification {rolled_back}")
    print(
        f"runs whose first {needed}+ pre-change measurements passed "
        f"(would have verified under the old rule): {old_rule_passes}"
    )
    if deviations:
        print(
            f"largest distance of a counted value from {HARMFUL_RATIO:g}: {max(deviations):.4f} "
            f"(median {statistics.median(deviations):.4f})"
        )
    met = rolled_back == len(rows) == args.runs and all(d < 0.02 for d in deviations)
    print(
        f"target: every run rolled back, every counted value post-change: "
        f"{'met' if met else 'MISSED'}; total {time.monotonic() - started:.0f} s"
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
