"""How fast a worker reacts to a fault: fault -> `undo` started -> rollback verified.

A real Prometheus scrapes a fault service every 1 s; one action type verifies every
1 s with an error-ratio signal and an `error_spike` stop condition (the same PromQL).
Each run proposes, approves, claims and launches one action on a fresh service whose
`run` is a no-op; once verification is under way (its first measurement was taken) and
after a random part of an interval (so the fault lands at a random phase of both the
scrape and the verification grid, as a real one would), the bench itself switches the
service to a 60 % error ratio and stamps that instant. It then records, in the same
process, when the executor reported "undo started" and when the rollback was verified
(the execution's `rollback_verified_at`), plus which stop-condition value fired.

Prints one row per run, then the median and p90 (nearest rank) of both figures.
Target: fault -> undo start p90 <= 3 s (the floor is one scrape plus one interval).
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
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
    monotonic_grid_phase,
    percentile,
    pid_tag,
    print_facts,
    propose_approved,
    scrape_phase,
    sigterm_as_interrupt,
    wait_for_values,
    write_catalog,
)
from opsgate.executor.executor import Executor, ExecutorEvent  # noqa: E402
from opsgate.models import ActionState  # noqa: E402
from opsgate.store import open_store  # noqa: E402
from opsgate.verification.prometheus import PrometheusProvider  # noqa: E402

ACTION = "toggle_feature_flag"  # a name the default bundle allowlists in staging
TARGET_MS = 3000.0
INTERVAL = 1.0  # verification interval, seconds; Prometheus scrapes every 1 s too
FAULT_RATIO = 0.6
HEAL = [sys.executable, "-m", "tests.integration.fault_service", "set"]
HEAL += ["--url", "{fault_url}", "--service", "{target}"]


@dataclass
class Timeline:
    """What the executor reported for one action, stamped on arrival (monotonic)."""

    first_verify: threading.Event = field(default_factory=threading.Event)
    undo_started: float | None = None
    finished: float | None = None
    final_state: ActionState | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Recorder:
    """The executor's `on_event` listener: cheap, thread-safe, never raises."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._timelines: dict[str, Timeline] = {}

    def timeline(self, action_id: str) -> Timeline:
        with self._lock:
            return self._timelines.setdefault(action_id, Timeline())

    def __call__(self, event: ExecutorEvent) -> None:
        now = time.monotonic()
        timeline = self.timeline(event.action_id)
        if event.kind == "measured" and event.watch is not None and event.watch.phase == "verify":
            timeline.first_verify.set()
        elif event.kind == "step" and event.message == "undo started":
            timeline.undo_started = now
        elif event.kind == "finished":
            timeline.finished = now
            timeline.final_state = event.state
            timeline.done.set()


def action_type(
    window: str, fn: str, halt_min: float, hold: float, relative: bool
) -> dict[str, Any]:
    query = error_ratio("{target}", window, fn)
    return {
        "name": ACTION,
        "risk": "medium",  # one approval
        "params": {"fault_url": {"type": "string", "pattern": r"^http://127\.0\.0\.1:[0-9]+$"}},
        # `run` changes nothing: the bench injects the fault itself, at a stamped instant.
        "run": {"argv": ["true"], "timeout": "10s"},
        # `undo` is a real process that heals the service, as a runner step would.
        "undo": {"argv": [*HEAL, "--ratio", "0"], "timeout": "20s"},
        "verification": {
            "interval": f"{INTERVAL:g}s",
            # hold must outlast the random injection delay (< 1 interval) plus the time
            # the signal needs to see the fault (a scrape and a tick), or verification
            # would succeed before the fault shows; the rollback is verified with the
            # same hold, so it is also part of fault -> rollback verified.
            "hold": f"{hold:g}s",
            "timeout": "30s",
            "signals": [{"name": "error_rate", "query": query, "pass": {"max": 0.05}}],
            # Relative by default, as the shipped mitigations stop: "this much worse than
            # the baseline measured just before run" (the baseline here is 0).
            "stop_conditions": [
                {
                    "name": "error_spike",
                    "query": query,
                    "halt": {"baseline_plus": halt_min} if relative else {"min": halt_min},
                }
            ],
            # Failed signal measurements are tolerated here so that what ends the
            # verification is the stop condition this bench measures, not the count.
            "failure_limit": 20,
            "error_limit": 3,
        },
    }


@dataclass
class RunResult:
    service: str
    outcome: str
    fault_to_undo: float | None  # seconds
    fault_to_verified: float | None
    fault_to_fired: float | None  # to the tick whose measurement was in the halt range
    fired_to_undo: float | None  # executor: decision, transaction, pool hand-off
    trigger: str
    values: list[float]


def _seconds_since(at: datetime | None, wall: float) -> float | None:
    return None if at is None else at.timestamp() - wall


def one_run(
    index: int,
    service: str,
    executor: Executor,
    recorder: Recorder,
    gate: Any,
    store: Any,
    faults: Any,
    rng: random.Random,
) -> RunResult:
    action_id = propose_approved(
        gate, ACTION, service, {"fault_url": faults.url}, f"reaction bench run {index}"
    )
    timeline = recorder.timeline(action_id)
    claimed = executor.claim(action_id)
    if claimed is None or claimed.state is not ActionState.EXECUTING:
        raise SystemExit(f"run {index}: claim gave {claimed.state if claimed else None}")
    executor.launch(action_id)
    if not timeline.first_verify.wait(15):
        raise SystemExit(f"run {index}: no verification measurement within 15 s")
    time.sleep(rng.uniform(0.0, INTERVAL))
    fault_wall = time.time()
    fault_mono = time.monotonic()
    faults.set_error_ratio(service, FAULT_RATIO)
    if not timeline.done.wait(60):
        raise SystemExit(f"run {index}: action {action_id} not finished 60 s after the fault")
    execution = store.get_execution(action_id)
    faults.set_error_ratio(service, 0.0)  # in case the undo did not run (a missed stop)
    assert execution is not None
    stops = [
        m
        for m in store.measurements_for(action_id)
        if m.kind == "stop_condition" and m.phase == "verify" and m.at.timestamp() >= fault_wall
    ]
    fired = next((m for m in stops if m.outcome == "fail"), None)
    undo_at = timeline.undo_started
    trigger = "-"
    if execution.trigger_name is not None:
        value = "" if execution.trigger_value is None else f"={execution.trigger_value:.3f}"
        trigger = f"{execution.trigger_name}{value}"
    final = timeline.final_state.value if timeline.final_state else "-"
    return RunResult(
        service=service,
        outcome=f"{execution.outcome or '-'}/{final}",
        fault_to_undo=None if undo_at is None else undo_at - fault_mono,
        fault_to_verified=_seconds_since(execution.rollback_verified_at, fault_wall),
        fault_to_fired=_seconds_since(fired.at, fault_wall) if fired else None,
        fired_to_undo=(
            None
            if fired is None or execution.undo_started_at is None
            else (execution.undo_started_at - fired.at).total_seconds()
        ),
        trigger=trigger,
        values=[m.value for m in stops if m.value is not None],
    )


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--window",
        default="3s",
        help="range of the error-ratio rate (default 3s: with a 1 s scrape it always "
        "holds 3 samples, so the rate is never empty; 2s can hold only one sample when a "
        "scrape is a little late, and every extra second of window delays the crossing)",
    )
    parser.add_argument("--fn", choices=("rate", "irate"), default="rate")
    parser.add_argument("--halt", type=float, default=0.3, help="stop condition halt min")
    parser.add_argument("--hold", type=float, default=4.0, help="verification hold, seconds")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--absolute",
        action="store_true",
        help="halt at a fixed level instead of relative to the baseline",
    )
    args = parser.parse_args()
    if not re.fullmatch(r"[0-9]+(ms|s|m)", args.window):
        parser.error("--window is a PromQL duration such as 3s")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    sigterm_as_interrupt()
    child_pythonpath()

    services = [f"react-{pid_tag()}-{i}" for i in range(args.runs)]
    query = error_ratio("{target}", args.window, args.fn)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="opsgate-reaction-") as tmp,
        fault_and_prometheus(services, Path(tmp)) as (faults, prometheus),
    ):
        # Every service exists from the start with a 0 error ratio and never had a
        # fault, so each run's rate window is clean; wait until each has a rate.
        waited = wait_for_values(prometheus, [query.replace("{target}", s) for s in services], 30)
        store = open_store(f"sqlite:///{Path(tmp) / 'opsgate.db'}")
        store.migrate()
        catalog = write_catalog(
            Path(tmp) / "catalog",
            [action_type(args.window, args.fn, args.halt, args.hold, not args.absolute)],
        )
        gate = make_gate(store, catalog)
        provider = PrometheusProvider(prometheus.url, timeout=2.0)
        recorder = Recorder()
        executor = Executor(
            store,
            gate,
            provider,
            worker_id="bench-reaction",
            on_event=recorder,
        )
        executor.start()
        results: list[RunResult] = []
        try:
            print_facts("reaction", f"{args.runs} runs, one at a time")
            halt = f"baseline + {args.halt:g}" if not args.absolute else f"{args.halt:g}"
            print(
                f"{args.runs} runs; Prometheus {prometheus.url} scraping every 1 s; "
                f"interval {INTERVAL:g}s, signal/stop query "
                f"{args.fn}[{args.window}], halt >= {halt}, hold {args.hold:g}s; "
                f"fault = error ratio 0 -> {FAULT_RATIO:g} at a random phase (seed {seed}); "
                f"run = `true`, undo = a shell step that sets the ratio back to 0"
            )
            print(f"(waited {waited:.1f}s for the first rates of {len(services)} fresh services)")
            scrape = scrape_phase(prometheus)
            grid = monotonic_grid_phase(INTERVAL)
            if scrape is not None:
                print(
                    f"phases in the wall-clock second: scrapes at .{scrape * 1000:03.0f}, "
                    f"hub ticks at .{grid * 1000:03.0f}: a new sample waits "
                    f"{((grid - scrape) % 1.0) * 1000:.0f} ms (+ query) for the next tick"
                )
            print()
            header = (
                f"{'run':>3}  {'fault->fired':>12}  {'fired->undo':>11}  {'fault->undo':>11}  "
                f"{'fault->verified':>15}  {'outcome':<20}  {'trigger':<18}  "
                "stop values after fault"
            )
            print(header)
            print("-" * len(header))
            for index, service in enumerate(services, start=1):
                result = one_run(index, service, executor, recorder, gate, store, faults, rng)
                results.append(result)
                values = " ".join(f"{v:.2f}" for v in result.values)
                print(
                    f"{index:>3}  {ms(result.fault_to_fired):>10}ms  "
                    f"{ms(result.fired_to_undo):>9}ms  {ms(result.fault_to_undo):>9}ms  "
                    f"{ms(result.fault_to_verified):>13}ms  {result.outcome:<20}  "
                    f"{result.trigger:<18}  {values}",
                    flush=True,
                )
        finally:
            executor.close()
            provider.close()
            store.close()

    undo = [r.fault_to_undo for r in results if r.fault_to_undo is not None]
    verified = [r.fault_to_verified for r in results if r.fault_to_verified is not None]
    fired = [r.fault_to_fired for r in results if r.fault_to_fired is not None]
    overhead = [r.fired_to_undo for r in results if r.fired_to_undo is not None]
    stopped = sum(1 for r in results if r.outcome == "stopped/rolled_back")
    print()
    print(f"runs: {len(results)}, stopped by error_spike and rolled back: {stopped}")
    for label, samples in (
        ("fault -> stop condition fired (tick)", fired),
        ("fired -> undo started (executor)", overhead),
        ("fault -> undo started", undo),
        ("fault -> rollback verified", verified),
    ):
        if samples:
            print(
                f"{label:<38} median {statistics.median(samples) * 1000:6.0f} ms   "
                f"p90 {percentile(samples, 0.9) * 1000:6.0f} ms   "
                f"max {max(samples) * 1000:6.0f} ms   (n={len(samples)})"
            )
    met = (
        len(undo) == len(results) == args.runs
        and stopped == args.runs
        and percentile(undo, 0.9) * 1000 <= TARGET_MS
    )
    p90 = f"{percentile(undo, 0.9):.2f} s" if undo else "n/a"
    print(
        f"target fault->undo p90 <= {TARGET_MS / 1000:.1f} s: {'met' if met else 'missed'} "
        f"(p90 {p90}); total bench time {time.monotonic() - started:.0f} s"
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
