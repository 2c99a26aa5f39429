"""1,000 actions verifying at once in one worker, against a real Prometheus.

One `Executor` (so one `VerificationHub` thread) on a SQLite store (or a scratch
PostgreSQL database with `--postgres`) holds N approved actions spread over S services;
each verifies every 1 s with an error-ratio signal and an `error_spike` stop condition
that share their PromQL, so the whole fleet asks S distinct queries. `run` and `undo`
use a trivial in-process runner (`runner: noop`) so N actions start in seconds
without N processes. Once all N are verifying, the bench records every tick for
`--intervals` intervals: watches measured, queries sent (the hub's count, cross-checked
by Prometheus's own request counter), the tick's start lag behind its grid point, its
duration (query + evaluate, and the store transaction holding every measurement), and
the process CPU used per interval.

Target: queries per interval = number of distinct queries, and one worker keeps every
interval on time (each tick starts within 10 % of the interval after its grid point,
no grid point is skipped, and the whole tick, store included, ends within the interval).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._rig import (  # noqa: E402
    error_ratio,
    fault_and_prometheus,
    make_gate,
    percentile,
    pid_tag,
    print_facts,
    propose_approved,
    sigterm_as_interrupt,
    wait_for_values,
    write_catalog,
)
from opsgate.executor.executor import Executor, ExecutorEvent  # noqa: E402
from opsgate.executor.runners import RunnerRegistry, StepResult  # noqa: E402
from opsgate.models import ActionState, Step  # noqa: E402
from opsgate.store import open_store  # noqa: E402
from opsgate.verification.hub import TickReport  # noqa: E402
from opsgate.verification.prometheus import PrometheusProvider  # noqa: E402
from opsgate.verification.provider import ProviderHealth, QueryResult  # noqa: E402

ACTION = "restart_service"  # a name the default bundle allowlists in staging
INTERVAL = 1.0
MAX_LAG = 0.1 * INTERVAL  # "on time": a tick starts within this of its grid point
QUERY_HANDLER = "/api/v1/query"


class NoopRunner:
    """`runner: noop`: a step that succeeds at once, in-process."""

    name = "noop"

    def run(
        self,
        step: Step,
        values: Mapping[str, Any],
        *,
        secrets: Collection[str] = (),
        cancel: threading.Event | None = None,
    ) -> StepResult:
        return StepResult(ok=True, exit_code=0, output="", value="")


@dataclass
class Tick:
    """One hub tick as seen from the provider call and the sink, in the hub thread."""

    query_start: float  # monotonic
    cpu_process: float  # process_time() at query_start
    cpu_thread: float  # thread_time() of the hub thread at query_start
    queries: int
    query_end: float = 0.0
    report: TickReport | None = None
    start: float = 0.0  # the hub's own tick start: sink call - report.duration
    sink_start: float = 0.0
    sink_end: float = 0.0
    cpu_thread_end: float = 0.0

    @property
    def lag(self) -> float:
        return self.start - math.floor(self.start / INTERVAL) * INTERVAL

    @property
    def grid(self) -> int:
        return math.floor(self.start / INTERVAL)

    @property
    def full(self) -> float:
        """Query, evaluate and store: the whole tick."""
        return self.sink_end - self.start

    @property
    def watches(self) -> int:
        return len(self.report.watches) if self.report else 0

    @property
    def verifying(self) -> int:
        return sum(1 for w in self.report.watches if w.phase == "verify") if self.report else 0

    @property
    def distinct(self) -> int:
        if self.report is None:
            return 0
        return len({q for w in self.report.watches for q in w.queries})


class TimedProvider:
    """Wraps the real provider: stamps each tick's query call (it runs in the hub thread)."""

    def __init__(self, inner: PrometheusProvider) -> None:
        self.inner = inner
        self.ticks: list[Tick] = []
        self.lock = threading.Lock()

    def query_many(self, queries: Sequence[str]) -> dict[str, QueryResult]:
        tick = Tick(time.monotonic(), time.process_time(), time.thread_time(), len(queries))
        results = self.inner.query_many(queries)
        tick.query_end = time.monotonic()
        with self.lock:
            self.ticks.append(tick)
        return results

    def check_health(self) -> ProviderHealth:
        return self.inner.check_health()

    def scrape_interval(self) -> float | None:
        return self.inner.scrape_interval()

    def timed_sink(self, inner: Callable[[TickReport], None]) -> Callable[[TickReport], None]:
        """The executor's sink (one store transaction per tick), timed."""

        def sink(report: TickReport) -> None:
            entered = time.monotonic()
            try:
                inner(report)
            finally:
                with self.lock:
                    tick = self.ticks[-1] if self.ticks else None
                if tick is not None and tick.report is None:
                    tick.report = report
                    tick.start = entered - report.duration
                    tick.sink_start = entered
                    tick.sink_end = time.monotonic()
                    tick.cpu_thread_end = time.thread_time()

        return sink

    def snapshot(self) -> list[Tick]:
        with self.lock:
            return [t for t in self.ticks if t.report is not None]


class Counter:
    """The executor's `on_event` listener: counts actions verifying and finished."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.verifying = 0
        self.finished: dict[str, int] = {}
        self.all_verifying = threading.Event()
        self.target = 0

    def __call__(self, event: ExecutorEvent) -> None:
        if event.kind == "state" and event.state is ActionState.VERIFYING:
            with self.lock:
                self.verifying += 1
                if self.verifying >= self.target:
                    self.all_verifying.set()
        elif event.kind == "finished":
            state = event.state.value if event.state else "released"
            with self.lock:
                self.finished[state] = self.finished.get(state, 0) + 1


def action_type(hold: float, window: str) -> dict[str, Any]:
    query = error_ratio("{service}", window)
    noop = {"runner": "noop", "argv": ["noop"], "timeout": "10s"}
    return {
        "name": ACTION,
        "risk": "medium",
        "params": {"service": {"type": "string", "pattern": "^[a-z0-9-]{1,63}$"}},
        "run": noop,
        "undo": noop,
        "verification": {
            "interval": f"{INTERVAL:g}s",
            "hold": f"{hold:g}s",
            "timeout": f"{hold + 120:g}s",
            "signals": [{"name": "error_rate", "query": query, "pass": {"max": 0.05}}],
            "stop_conditions": [{"name": "error_spike", "query": query, "halt": {"min": 0.3}}],
            "failure_limit": 2,
            "error_limit": 3,
        },
    }


def prometheus_counters(server: Any) -> tuple[float, float]:
    """(instant queries Prometheus has answered, its CPU seconds), read from its /metrics."""
    return (
        server.self_metric("prometheus_http_requests_total", handler=QUERY_HANDLER),
        server.self_metric("process_cpu_seconds_total"),
    )


def scratch_postgres(stack: ExitStack, server_url: str) -> str:
    """Create a fresh database on `server_url`'s server; dropped when `stack` closes."""
    import psycopg  # only needed with --postgres

    parts = urlsplit(server_url)
    name = f"opsgate_fanout_{pid_tag()}"
    admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    stack.callback(drop)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=1000)
    parser.add_argument("--services", type=int, default=10)
    parser.add_argument("--intervals", type=int, default=10)
    parser.add_argument(
        "--hold",
        type=float,
        default=40.0,
        help="verification hold, seconds: long enough that the first action started is "
        "still verifying when the last one starts and for --intervals more",
    )
    parser.add_argument("--window", default="1m", help="rate window of the error ratio")
    parser.add_argument("--concurrency", type=int, default=8, help="executor step threads")
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="a PostgreSQL server (e.g. postgresql://postgres@127.0.0.1:5432); the bench "
        "creates a scratch database there and drops it at the end (default: SQLite)",
    )
    args = parser.parse_args()
    sigterm_as_interrupt()
    bench_started = time.monotonic()

    services = [f"fan-{pid_tag()}-{i}" for i in range(args.services)]
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="opsgate-fanout-")))
        _faults, prometheus = stack.enter_context(fault_and_prometheus(services, tmp))
        wait_for_values(prometheus, [error_ratio(s, args.window) for s in services], 30)
        if args.postgres:
            url = scratch_postgres(stack, args.postgres)
            where = f"PostgreSQL scratch database {urlsplit(url).path.lstrip('/')}"
        else:
            url = f"sqlite:///{tmp / 'opsgate.db'}"
            where = "SQLite (WAL, synchronous=FULL)"
        store = open_store(url)
        stack.callback(store.close)
        store.migrate()
        catalog = write_catalog(tmp / "catalog", [action_type(args.hold, args.window)])
        gate = make_gate(store, catalog)

        print_facts(
            "fanout",
            f"{args.intervals} verification intervals of {args.actions} actions",
            postgres_url=url if url.startswith("postgresql") else None,
        )
        print(
            f"fanout: {args.actions} actions over {args.services} services, one worker "
            f"(one hub thread, {args.concurrency} step threads), store: {where}"
        )
        print(
            f"Prometheus {prometheus.url} scraping every 1 s; interval {INTERVAL:g}s, hold "
            f"{args.hold:g}s, signal and stop condition share one query per service; "
            "run/undo: in-process `noop` runner (no process per action)"
        )
        t0 = time.monotonic()
        for i in range(args.actions):
            propose_approved(
                gate,
                ACTION,
                f"node-{i:05d}",
                {"service": services[i % args.services]},
                "fanout bench",
            )
        proposed = time.monotonic() - t0
        print(
            f"proposed + approved {args.actions} in {proposed:.1f}s "
            f"({proposed / args.actions * 1000:.1f} ms each)"
        )

        provider = PrometheusProvider(prometheus.url, timeout=2.0)
        stack.callback(provider.close)
        timed = TimedProvider(provider)
        counter = Counter()
        counter.target = args.actions
        executor = Executor(
            store,
            gate,
            timed,
            RunnerRegistry({"noop": NoopRunner()}),
            worker_id="bench-fanout",
            concurrency=args.concurrency,
            on_event=counter,
        )
        hub = executor.hub
        hub.keep_ticks = 100_000
        assert hub.sink is not None  # the executor's sink: one transaction per tick
        # Instrumentation only: the executor fixes its sink at construction, the bench
        # times it from the outside.
        hub._sink = timed.timed_sink(hub.sink)
        stack.callback(executor.close)
        executor.start()

        t0 = time.monotonic()
        launched = 0
        while (action := executor.claim()) is not None:
            if action.state is not ActionState.EXECUTING:
                raise SystemExit(f"{action.id} was {action.state.value} at claim")
            executor.launch(action.id)
            launched += 1
        claimed = time.monotonic() - t0
        if not counter.all_verifying.wait(120):
            raise SystemExit(f"only {counter.verifying} of {args.actions} verifying after 120 s")
        all_verifying_at = time.monotonic()
        print(
            f"claimed + launched {launched} in {claimed:.1f}s; all {args.actions} verifying "
            f"{all_verifying_at - t0:.1f}s after the first claim"
        )

        def window_ticks() -> list[Tick]:
            return [
                t
                for t in timed.snapshot()
                if t.start > all_verifying_at and t.verifying == args.actions
            ]

        # The first full tick opens the window; Prometheus's counters are read just after it.
        while not window_ticks():
            time.sleep(0.05)
        prom_before = prometheus_counters(prometheus)
        deadline = time.monotonic() + args.intervals * INTERVAL * 3 + 10
        while len(window_ticks()) < args.intervals + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        prom_after = prometheus_counters(prometheus)
        ticks = window_ticks()[: args.intervals + 1]
        if len(ticks) < args.intervals + 1:
            print(
                f"WARNING: only {len(ticks)} ticks had all {args.actions} verifying "
                f"(hold {args.hold:g}s too short?)"
            )
        verifying_window = len(ticks) - 1

        print()
        header = (
            f"{'#':>2}  {'watches':>7}  {'distinct':>8}  {'sent':>4}  {'lag ms':>6}  "
            f"{'skipped':>7}  {'query ms':>8}  {'eval ms':>7}  {'store ms':>8}  "
            f"{'tick ms':>7}  {'CPU ms/interval':>15}  {'hub thread CPU ms':>17}"
        )
        print(header)
        print("-" * len(header))
        cpu: list[float] = []
        skipped_total = 0
        for n, (tick, following) in enumerate(itertools.pairwise(ticks), start=1):
            skipped = following.grid - tick.grid - 1
            skipped_total += max(0, skipped)
            process_cpu = following.cpu_process - tick.cpu_process
            cpu.append(process_cpu)
            print(
                f"{n:>2}  {tick.watches:>7}  {tick.distinct:>8}  {tick.queries:>4}  "
                f"{tick.lag * 1000:>6.1f}  {skipped:>7}  "
                f"{(tick.query_end - tick.query_start) * 1000:>8.1f}  "
                f"{(tick.sink_start - tick.query_end) * 1000:>7.1f}  "
                f"{(tick.sink_end - tick.sink_start) * 1000:>8.1f}  {tick.full * 1000:>7.1f}  "
                f"{process_cpu * 1000:>15.0f}  "
                f"{(tick.cpu_thread_end - tick.cpu_thread) * 1000:>17.0f}"
            )
        measured = ticks[:-1]
        if not measured:
            print("no complete interval with every action verifying was recorded")
            return 1

        distinct = max(t.distinct for t in measured)
        sent = max(t.queries for t in measured)
        max_lag = max(t.lag for t in measured)
        max_full = max(t.full for t in measured)
        span = ticks[-1].start - ticks[0].start
        prom_queries = prom_after[0] - prom_before[0]
        prom_cpu = prom_after[1] - prom_before[1]
        print()
        print(
            f"distinct queries per interval: {distinct} (services: {args.services}); "
            f"queries sent per interval: max {sent}, min {min(t.queries for t in measured)}"
        )
        print(
            f"Prometheus answered {prom_queries:.0f} instant queries over ~{verifying_window} "
            f"intervals ({prom_queries / max(verifying_window, 1):.1f} per interval; read from "
            f"its own /metrics, so it also counts anything else that queried it); its CPU: "
            f"{prom_cpu / max(span, 1e-9) * 1000:.0f} ms per second"
        )
        print(
            f"on time: max start lag {max_lag * 1000:.1f} ms (limit {MAX_LAG * 1000:.0f} ms), "
            f"grid points skipped {skipped_total}, max tick duration incl. store "
            f"{max_full * 1000:.0f} ms (interval {INTERVAL * 1000:.0f} ms)"
        )
        print(
            f"worker CPU per interval (whole process): median {statistics.median(cpu) * 1000:.0f} "
            f"ms, max {max(cpu) * 1000:.0f} ms, p90 {percentile(cpu, 0.9) * 1000:.0f} ms "
            f"(= {statistics.median(cpu) / INTERVAL * 100:.0f} % of one core; machine has "
            f"{os.cpu_count()} cores)"
        )
        queries_ok = all(t.queries == t.distinct for t in measured) and distinct == args.services
        on_time = (
            max_lag <= MAX_LAG
            and skipped_total == 0
            and max_full < INTERVAL
            and len(measured) == args.intervals
        )
        print(
            f"target queries per interval = distinct queries: {'met' if queries_ok else 'missed'}; "
            f"one worker keeps every interval on time: {'met' if on_time else 'missed'}"
        )

        # Let every action finish: they succeed once their hold has passed.
        left = args.hold + 60
        if not executor.wait_idle(timeout=left):
            print(f"WARNING: {executor.in_flight} actions still running after {left:g}s")
        states = {
            state.value: len(store.list_actions(states=[state], limit=args.actions + 1))
            for state in (ActionState.SUCCEEDED, ActionState.ROLLED_BACK, ActionState.VERIFYING)
        }
        print(
            f"finished: {dict(sorted(counter.finished.items()))}; in the store: {states}; "
            f"total bench time {time.monotonic() - bench_started:.0f}s"
        )
        return 0 if queries_ok and on_time else 1


if __name__ == "__main__":
    sys.exit(main())
