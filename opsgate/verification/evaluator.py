"""Verification semantics as pure functions: no I/O, no clock; time is an argument.

The caller (the verification loop) renders each signal's and stop condition's query,
asks a `SignalProvider` for the results once per interval, and folds them into a
`VerificationState` with `step`. Rules (docs/design.md, "Verification semantics"):

- A measurement is `pass`, `fail`, `inconclusive` (no data: empty vector or NaN) or
  `error` (the provider failed, the query is invalid, returned several series, or no
  result/rendered query was supplied for it: fail closed).
- Stop conditions are looked at first: one measurement in its `halt` range ends the
  verification as `stopped`, whatever the signals say in the same interval.
- `failures` counts failed *signal* measurements over the whole verification (not
  consecutive); `failures > failure_limit` ends it as `failed_verification`
  (`failures == failure_limit` is still tolerated).
- `consecutive_errors` is kept **per query name**, for signals *and* stop conditions
  (a stop condition we cannot read is a watch we cannot keep). A name's streak grows
  by one for each `error` measurement and resets to 0 on any other outcome (pass,
  fail or inconclusive: the provider answered). When any streak exceeds
  `error_limit` the verification ends as `provider_errors`. Errors do not count as
  failures, and failures do not count as errors.
- Post-change evidence: a signal measurement counts toward `hold` and `failures` only
  when the data behind it postdates the change. The caller sets `evidence_from` (the
  end of `run` plus the queries' longest look-back plus one scrape interval, see
  `opsgate.verification.lookback`) and `settled_at` (the end of `initial_delay`); a
  signal measurement *asked for* before either is stored with `not_counted`
  (`pre_change` or `settling`), neither fails nor passes the verification, and resets
  `passing_since`. Stop conditions are not gated (they watch from the first second),
  and errors count against `error_limit` as always: a query nobody can answer is no
  evidence either way.
- `hold` only counts time during which every signal passed: `passing_since` is the
  time of the first interval of the current run of intervals in which every signal
  passed; any interval in which one signal is not `pass` resets it to None. Stop
  conditions do not affect `hold`.
- Success: every signal passed in this interval and `now - passing_since >= hold` (less
  a timer slack of 2% of an interval, at most 50 ms: grid ticks arrive a few ms early). As
  `passing_since` is only set by an interval where every signal passed, success
  always rests on at least one passing measurement of every signal ("no evidence, no
  pass"): with `hold: 0` it takes one interval where every signal passed; a silent
  (empty) signal never succeeds; a spec without signals never succeeds.
- Timeout: `now - started_at >= timeout` without success (success is checked first,
  so a hold completed by the last interval before the deadline still succeeds).
- Precedence inside one interval: stopped > failed_verification > provider_errors >
  succeeded > timeout.

`step` returns lightweight `MeasurementRecord`s (no action id); the caller stores
them with `record.to_measurement(action_id, phase)`. Every record of an interval,
including the ones taken in the interval that decided the outcome, is returned: every
measurement is evidence. Each record's `at` is the step's `now`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from opsgate.models import Measurement, Range, Signal, StopCondition, VerificationSpec
from opsgate.verification.provider import QueryResult

__all__ = [
    "MeasurementKind",
    "MeasurementOutcome",
    "MeasurementRecord",
    "NotCounted",
    "VerificationOutcome",
    "VerificationState",
    "classify_signal",
    "classify_stop",
    "evidence_wait",
    "fmt_range",
    "halt_range_text",
    "in_range",
    "pass_range_text",
    "remaining_hold",
    "step",
]

MeasurementOutcome = Literal["pass", "fail", "inconclusive", "error"]
NotCounted = Literal["pre_change", "settling"]
MeasurementKind = Literal["signal", "stop_condition"]
VerificationOutcome = Literal[
    "succeeded", "failed_verification", "timeout", "provider_errors", "stopped"
]


def _has_value(result: QueryResult) -> bool:
    return result.error is None and result.value is not None and not math.isnan(result.value)


class NoBaseline(ValueError):
    """A relative range without a baseline value to be relative to."""


def in_range(
    r: Range, value: float, baseline: float | None, relative_bounds: Literal["min", "max"]
) -> bool:
    """Within the absolute bounds, or beyond the relative one (`relative_bounds` says
    whether the relative bound is a minimum or a maximum). Raises NoBaseline for a
    relative range without a baseline: the caller fails closed."""
    if r.contains(value):
        return True
    if not r.relative:
        return False
    if baseline is None or not math.isfinite(baseline):
        raise NoBaseline("no baseline value to compare with")
    threshold = r.threshold(baseline)
    return value >= threshold if relative_bounds == "min" else value <= threshold


def _pass_side(signal: Signal) -> Literal["min", "max"]:
    # Passing is the better side of the baseline.
    return "max" if signal.worse_when == "higher" else "min"


def _halt_side(stop: StopCondition) -> Literal["min", "max"]:
    # Halting is the worse side of the baseline.
    return "min" if stop.worse_when == "higher" else "max"


def classify_signal(
    signal: Signal, result: QueryResult, baseline: float | None = None
) -> MeasurementOutcome:
    """`pass` when the value is in the signal's pass range (inclusive), else `fail`;
    `error` when the provider reported one or a relative range has no baseline;
    `inconclusive` when there is no value."""
    if result.error is not None:
        return "error"
    if not _has_value(result):
        return "inconclusive"
    assert result.value is not None
    try:
        passed = in_range(signal.pass_, result.value, baseline, _pass_side(signal))
    except NoBaseline:
        return "error"
    return "pass" if passed else "fail"


def classify_stop(stop: StopCondition, result: QueryResult, baseline: float | None = None) -> bool:
    """True (halt) only for a real value inside the halt range; no data or an error
    never halts by itself (errors are counted against `error_limit` instead)."""
    if not _has_value(result):
        return False
    assert result.value is not None
    return in_range(stop.halt, result.value, baseline, _halt_side(stop))


def fmt_range(
    r: Range, relative_bounds: Literal["min", "max"], baseline: float | None = None
) -> str:
    """`<= 0.01`, `[0, 1]`, `>= baseline + 0.05 (0.35)`, `<= 0.01 or <= baseline * 0.5`."""
    parts: list[str] = []
    if r.min is not None and r.max is not None:
        parts.append(f"[{r.min:g}, {r.max:g}]")
    elif r.min is not None:
        parts.append(f">= {r.min:g}")
    elif r.max is not None:
        parts.append(f"<= {r.max:g}")
    if r.relative:
        op = ">=" if relative_bounds == "min" else "<="
        form = (
            f"baseline + {r.baseline_plus:g}"
            if r.baseline_plus is not None
            else f"baseline * {r.baseline_times:g}"
        )
        resolved = f" ({r.threshold(baseline):.4g})" if baseline is not None else ""
        parts.append(f"{op} {form}{resolved}")
    return " or ".join(parts)


def pass_range_text(signal: Signal, baseline: float | None = None) -> str:
    return fmt_range(signal.pass_, _pass_side(signal), baseline)


def halt_range_text(stop: StopCondition, baseline: float | None = None) -> str:
    return fmt_range(stop.halt, _halt_side(stop), baseline)


@dataclass(frozen=True)
class MeasurementRecord:
    """One measurement without its action: wrap with `to_measurement`.

    For a stop condition, `outcome` is `fail` when the value is in the halt range (it
    halted), `pass` when it is outside, else `inconclusive` / `error`.
    """

    name: str
    kind: MeasurementKind
    at: datetime
    value: float | None
    outcome: MeasurementOutcome
    detail: str = ""
    not_counted: NotCounted | None = None

    def to_measurement(
        self, action_id: str, phase: Literal["run", "verify", "rollback"] = "verify"
    ) -> Measurement:
        return Measurement(
            action_id=action_id,
            phase=phase,
            name=self.name,
            kind=self.kind,
            at=self.at,
            value=self.value,
            outcome=self.outcome,
            detail=self.detail,
            not_counted=self.not_counted,
        )


class VerificationState(BaseModel):
    """Where one verification stands. Frozen; `step` returns a new one.

    JSON-serializable (`model_dump_json`) so a worker can persist and resume it.
    `consecutive_errors` maps a signal or stop condition name to its current streak
    of consecutive `error` measurements (names without a streak are absent).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    started_at: datetime
    passing_since: datetime | None = None
    failures: int = 0
    consecutive_errors: dict[str, int] = Field(default_factory=dict)
    measurements: int = 0
    intervals: int = 0
    # Before either instant, signal measurements are evidence but do not count.
    evidence_from: datetime | None = None
    settled_at: datetime | None = None
    # Each query's value just before `run`, for ranges relative to it.
    baseline: dict[str, float] = Field(default_factory=dict)
    any_pass: bool = False
    last_at: datetime | None = None
    outcome: VerificationOutcome | None = None
    decided_by: str | None = None
    decided_kind: MeasurementKind | None = None
    decided_value: float | None = None
    ended_at: datetime | None = None
    detail: str = ""

    @classmethod
    def start(
        cls,
        now: datetime,
        *,
        evidence_from: datetime | None = None,
        settled_at: datetime | None = None,
        baseline: Mapping[str, float | None] | None = None,
    ) -> VerificationState:
        known = {k: v for k, v in (baseline or {}).items() if v is not None and math.isfinite(v)}
        return cls(
            started_at=now, evidence_from=evidence_from, settled_at=settled_at, baseline=known
        )

    def not_counted_at(self, at: datetime) -> NotCounted | None:
        """Why a signal measurement asked for at `at` does not count, if it does not."""
        if self.evidence_from is not None and at < self.evidence_from:
            return "pre_change"
        if self.settled_at is not None and at < self.settled_at:
            return "settling"
        return None

    def counting_starts(self) -> datetime | None:
        """When signal measurements start to count (None: from the start)."""
        instants = [t for t in (self.evidence_from, self.settled_at) if t is not None]
        return max(instants) if instants else None

    @property
    def done(self) -> bool:
        return self.outcome is not None

    @property
    def succeeded(self) -> bool:
        return self.outcome == "succeeded"


def _lookup(
    name: str,
    rendered: Mapping[str, str],
    results: Mapping[str, QueryResult],
    now: datetime,
) -> QueryResult:
    query = rendered.get(name)
    if query is None:
        return QueryResult.failed(f"no rendered query for {name!r}", now)
    result = results.get(query)
    if result is None:
        return QueryResult.failed(f"no result for the query of {name!r}", now)
    return result


def _signal_record(
    signal: Signal,
    result: QueryResult,
    now: datetime,
    not_counted: NotCounted | None,
    baseline: float | None = None,
) -> MeasurementRecord:
    outcome = classify_signal(signal, result, baseline)
    value = result.value if _has_value(result) else None
    if outcome == "error":
        detail = result.error or "a range relative to the baseline, without a baseline"
    elif outcome == "inconclusive":
        detail = "no data"
    else:
        where = "within" if outcome == "pass" else "outside"
        detail = f"{value:g} {where} pass range {pass_range_text(signal, baseline)}"
    if not_counted is not None and outcome in ("pass", "fail", "inconclusive"):
        detail += f" (not counted: {_NOT_COUNTED_WHY[not_counted]})"
    else:
        not_counted = None  # an error is counted against error_limit all the same
    return MeasurementRecord(signal.name, "signal", now, value, outcome, detail, not_counted)


_NOT_COUNTED_WHY: dict[str, str] = {
    "pre_change": "its window still reaches back before the change",
    "settling": "within initial_delay",
}


def _stop_record(
    stop: StopCondition, result: QueryResult, now: datetime, baseline: float | None = None
) -> MeasurementRecord:
    value = result.value if _has_value(result) else None
    outcome: MeasurementOutcome
    if result.error is not None:
        outcome, detail = "error", result.error
    elif value is None:
        outcome, detail = "inconclusive", "no data"
    else:
        try:
            halted = classify_stop(stop, result, baseline)
        except NoBaseline:
            # A watch we cannot keep: an error, counted against error_limit.
            return MeasurementRecord(
                stop.name,
                "stop_condition",
                now,
                value,
                "error",
                "a halt range relative to the baseline, without a baseline",
            )
        text = halt_range_text(stop, baseline)
        if halted:
            outcome, detail = "fail", f"{value:g} in halt range {text}"
        else:
            outcome, detail = "pass", f"{value:g} outside halt range {text}"
    return MeasurementRecord(stop.name, "stop_condition", now, value, outcome, detail)


def step(
    spec: VerificationSpec,
    state: VerificationState,
    now: datetime,
    results: Mapping[str, QueryResult],
    rendered: Mapping[str, str],
    asked_at: datetime | None = None,
) -> tuple[VerificationState, list[MeasurementRecord]]:
    """Fold one interval's results into `state` (see the module doc for the rules).

    `rendered` maps each signal / stop condition name to its rendered query and
    `results` maps a rendered query to its result (`SignalProvider.query_many`).
    `asked_at` is when the queries were sent (default `now`): Prometheus evaluates them
    at or after it, so a window that starts after `evidence_from - look-back` when
    asked holds post-change samples only. A finished state is returned unchanged,
    with no records.
    """
    if state.outcome is not None:
        return state, []

    records: list[MeasurementRecord] = []
    errors = dict(state.consecutive_errors)

    def track(record: MeasurementRecord) -> None:
        records.append(record)
        if record.outcome == "error":
            errors[record.name] = errors.get(record.name, 0) + 1
        else:
            errors.pop(record.name, None)

    halted: MeasurementRecord | None = None
    for stop in spec.stop_conditions:
        record = _stop_record(
            stop, _lookup(stop.name, rendered, results, now), now, state.baseline.get(stop.name)
        )
        track(record)
        if halted is None and record.outcome == "fail":
            halted = record

    not_counted = state.not_counted_at(asked_at or now)
    signal_records: list[MeasurementRecord] = []
    for signal in spec.signals:
        result = _lookup(signal.name, rendered, results, now)
        record = _signal_record(signal, result, now, not_counted, state.baseline.get(signal.name))
        track(record)
        signal_records.append(record)

    counted = [r for r in signal_records if r.not_counted is None]
    failed_now = [r for r in counted if r.outcome == "fail"]
    failures = state.failures + len(failed_now)
    all_pass = (
        bool(signal_records)
        and not_counted is None
        and all(r.outcome == "pass" for r in signal_records)
    )
    passing_since = (state.passing_since or now) if all_pass else None

    update: dict[str, object] = {
        "passing_since": passing_since,
        "failures": failures,
        "consecutive_errors": errors,
        "measurements": state.measurements + len(records),
        "intervals": state.intervals + 1,
        "any_pass": state.any_pass or any(r.outcome == "pass" for r in counted),
        "last_at": now,
    }

    def end(
        outcome: VerificationOutcome, detail: str, by: MeasurementRecord | None = None
    ) -> VerificationState:
        update.update(
            outcome=outcome,
            detail=detail,
            ended_at=now,
            decided_by=by.name if by else None,
            decided_kind=by.kind if by else None,
            decided_value=by.value if by else None,
        )
        return state.model_copy(update=update)

    over_limit = [r for r in records if errors.get(r.name, 0) > spec.error_limit]
    elapsed = (now - state.started_at).total_seconds()

    if halted is not None:
        final = end("stopped", f"stop condition {halted.name}: {halted.detail}", halted)
    elif failures > spec.failure_limit:
        culprit = failed_now[0]
        final = end(
            "failed_verification",
            f"{failures} failed measurements (failure_limit {spec.failure_limit}); "
            f"last: {culprit.name} {culprit.detail}",
            culprit,
        )
    elif over_limit:
        culprit = over_limit[0]
        final = end(
            "provider_errors",
            f"{errors[culprit.name]} consecutive errors for {culprit.name} "
            f"(error_limit {spec.error_limit}): {culprit.detail}",
            culprit,
        )
    elif (
        all_pass
        and passing_since is not None
        and (now - passing_since).total_seconds() + _jitter(spec) >= spec.hold
    ):
        final = end(
            "succeeded",
            f"every signal passed for {(now - passing_since).total_seconds():g}s "
            f"(hold {spec.hold:g}s)",
        )
    elif elapsed >= spec.timeout:
        held = (now - passing_since).total_seconds() if passing_since is not None else 0.0
        if not spec.signals:
            reason = "no signals defined"
        elif not_counted is not None:
            reason = f"still no post-change evidence ({not_counted.replace('_', '-')})"
        else:
            reason = f"passing for {held:g}s"
        final = end(
            "timeout",
            f"hold of {spec.hold:g}s not reached within timeout {spec.timeout:g}s ({reason})",
        )
    else:
        final = state.model_copy(update=update)
    return final, records


def _jitter(spec: VerificationSpec) -> float:
    """Timer slack: intervals measured on a grid arrive a few ms early or late, and a
    hold of exactly N intervals must not need an extra one for a millisecond."""
    return min(0.02 * spec.interval, 0.05)


def remaining_hold(spec: VerificationSpec, state: VerificationState, now: datetime) -> float:
    """Seconds of continuous passing still needed to succeed, for a live view.

    0 once succeeded; the full `hold` when no all-pass run is under way. A run in
    progress still needs one more all-pass interval at or after `passing_since + hold`.
    """
    if state.outcome == "succeeded":
        return 0.0
    if state.passing_since is None:
        return float(spec.hold)
    held = (now - state.passing_since).total_seconds()
    return max(0.0, spec.hold - held)


def evidence_wait(state: VerificationState, now: datetime) -> tuple[NotCounted | None, float]:
    """For a live view: why signal measurements do not count yet, and for how many
    more seconds (`(None, 0.0)` once they count)."""
    why = state.not_counted_at(now)
    until = state.evidence_from if why == "pre_change" else state.settled_at
    if why is None or until is None:
        return None, 0.0
    return why, max(0.0, (until - now).total_seconds())
