"""One scheduler thread measures every verification a worker holds.

Each watch is due on a grid of its interval (`k * interval` on the monotonic clock),
so watches with the same interval come due in the same tick, and the tick sends each
distinct query once, however many actions ask it: 1,000 actions watching the same
error rate cost one query per interval, not 1,000.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from opsgate.models import Range, VerificationSpec
from opsgate.shared import utcnow
from opsgate.verification.evaluator import MeasurementRecord, VerificationState, step
from opsgate.verification.provider import QueryResult, SignalProvider

log = logging.getLogger(__name__)

WatchPhase = Literal["run", "verify", "rollback"]
# While the action's step runs, only stop conditions are watched; hold and timeout
# start once it has finished, so they are switched off here.
_RUN_PHASE_SECONDS = 10.0**9


def stop_only(spec: VerificationSpec) -> VerificationSpec:
    """The spec watched while `run` is under way: stop conditions, no signals, no timeout."""
    return spec.model_copy(
        update={"signals": (), "hold": _RUN_PHASE_SECONDS, "timeout": _RUN_PHASE_SECONDS}
    )


# A rollback puts back the state from before the action: a signal judged against its
# baseline is verified back at it, within this margin.
ROLLBACK_BASELINE_MARGIN = 0.1


def rollback_check(spec: VerificationSpec) -> VerificationSpec:
    """The spec a rollback is verified with: the same signals, hold and timeout.

    Stop conditions are dropped (there is nothing left to halt) and failures are not
    counted: right after an undo the query windows still hold the bad samples, so a
    recovering service fails a few measurements on its way back. The rollback is
    verified once every signal passes for `hold`, and fails at `timeout` or on
    provider errors. A signal whose pass range is relative to the baseline (a
    mitigation's "half the baseline") cannot be expected to pass once the mitigation
    is undone: it passes back at its baseline (within 10 %) or in its absolute range.
    """
    signals = []
    for signal in spec.signals:
        if signal.pass_.relative:
            factor = 1 + ROLLBACK_BASELINE_MARGIN
            if signal.worse_when == "lower":
                factor = 1 - ROLLBACK_BASELINE_MARGIN
            back = Range(min=signal.pass_.min, max=signal.pass_.max, baseline_times=factor)
            signal = signal.model_copy(update={"pass_": back})
        signals.append(signal)
    return spec.model_copy(
        update={"signals": tuple(signals), "stop_conditions": (), "failure_limit": 10**9}
    )


@dataclass
class Watch:
    """One verification in progress; the hub owns `state` until `done` is set."""

    action_id: str
    phase: WatchPhase
    spec: VerificationSpec
    rendered: Mapping[str, str]  # signal / stop condition name -> rendered PromQL
    state: VerificationState
    on_done: Callable[[Watch], None] | None = None
    next_due: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    # Set from outside (a manual rollback, a shutdown): ends the watch at the next tick.
    abort_reason: str | None = None
    last_records: list[MeasurementRecord] = field(default_factory=list)
    last_results: Mapping[str, QueryResult] = field(default_factory=dict)

    @property
    def queries(self) -> list[str]:
        return list(dict.fromkeys(self.rendered.values()))


@dataclass(frozen=True)
class TickReport:
    """What one tick measured, handed to the sink to be stored in one transaction;
    `duration` (filled in after the sink) covers querying, evaluating and storing."""

    at: datetime
    watches: list[Watch]
    queries_sent: int
    duration: float


Sink = Callable[[TickReport], None]


class VerificationHub:
    """Measures every registered watch on its interval, from one thread."""

    def __init__(
        self,
        provider: SignalProvider,
        *,
        sink: Sink | None = None,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        # Fixed at construction: every tick of this hub is stored the same way.
        self._sink = sink
        self._clock = clock
        self._monotonic = monotonic
        self._watches: dict[int, Watch] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.ticks: list[TickReport] = []  # the latest few, for benchmarks and `--verbose`
        self.keep_ticks = 100

    @property
    def sink(self) -> Sink | None:
        """Where each tick's report goes (None: measured, not stored)."""
        return self._sink

    # --- registration ------------------------------------------------------------------

    def watch(self, watch: Watch) -> Watch:
        """Start measuring `watch` from the next point on its interval's grid."""
        interval = watch.spec.interval
        now = self._monotonic()
        watch.next_due = (math.floor(now / interval) + 1) * interval
        with self._cond:
            self._watches[id(watch)] = watch
            self._cond.notify_all()
        self._ensure_thread()
        return watch

    def unwatch(self, watch: Watch) -> None:
        with self._cond:
            self._watches.pop(id(watch), None)

    def abort(self, watch: Watch, reason: str) -> None:
        """Ask the hub to end `watch` at once (the next tick is taken immediately)."""
        with self._cond:
            watch.abort_reason = reason
            watch.next_due = 0.0
            self._cond.notify_all()

    def watches(self) -> list[Watch]:
        with self._cond:
            return list(self._watches.values())

    @property
    def active(self) -> int:
        with self._cond:
            return len(self._watches)

    # --- the loop ------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(
                target=self._loop, name="opsgate-verification", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    if self._watches:
                        wait = min(w.next_due for w in self._watches.values()) - self._monotonic()
                        if wait <= 0:
                            break
                        self._cond.wait(timeout=wait)
                    else:
                        self._cond.wait()
                if self._stopping:
                    return
                now_mono = self._monotonic()
                due = [w for w in self._watches.values() if w.next_due <= now_mono]
            try:
                self.tick(due)
            except Exception:  # a sink failure must not stop every other verification
                log.exception("verification tick failed")
                time.sleep(0.5)

    def tick(self, due: Sequence[Watch]) -> TickReport:
        """Measure `due` once: one provider call for their distinct queries."""
        started = self._monotonic()
        measuring = [w for w in due if w.abort_reason is None]
        queries = list(dict.fromkeys(q for w in measuring for q in w.queries))
        # Before the queries leave: Prometheus evaluates them at or after this instant,
        # which is what decides whether their windows hold post-change samples only.
        asked_at = self._clock()
        results = self.provider.query_many(queries) if queries else {}
        now = self._clock()
        for watch in due:
            if watch.abort_reason is not None:
                watch.last_records = []
                continue
            watch.state, watch.last_records = step(
                watch.spec, watch.state, now, results, watch.rendered, asked_at=asked_at
            )
            watch.last_results = {q: results[q] for q in watch.queries if q in results}
            # From the tick's start, not from now: watches that were due together stay
            # together even if this loop crosses a grid point.
            interval = watch.spec.interval
            watch.next_due = (math.floor(started / interval) + 1) * interval
        report = TickReport(now, list(due), len(queries), 0.0)
        if self._sink is not None:
            self._sink(report)
        report = dataclasses.replace(report, duration=self._monotonic() - started)
        finished = [w for w in due if w.state.done or w.abort_reason is not None]
        with self._cond:
            for watch in finished:
                self._watches.pop(id(watch), None)
            self.ticks.append(report)
            del self.ticks[: -self.keep_ticks]
        for watch in finished:
            watch.done.set()
            if watch.on_done is not None:
                watch.on_done(watch)
        return report
