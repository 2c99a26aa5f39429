from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import pytest

from opsgate.models import Range, Signal, StopCondition, VerificationSpec
from opsgate.verification.evaluator import (
    MeasurementRecord,
    VerificationState,
    classify_signal,
    classify_stop,
    remaining_hold,
    step,
)
from opsgate.verification.provider import QueryResult

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)

ERR_Q = "sum(rate(errors[1m]))"
LAT_Q = "histogram_quantile(0.99, latency)"
STOP_Q = "sum(rate(errors[1m])) / 2"

ERR = Signal(name="error_rate", query=ERR_Q, **{"pass": Range(max=0.01)})
LAT = Signal(name="latency", query=LAT_Q, **{"pass": Range(min=0, max=0.5)})
STOP = StopCondition(name="error_spike", query=STOP_Q, halt=Range(min=0.2))
RENDERED = {"error_rate": ERR_Q, "latency": LAT_Q, "error_spike": STOP_Q}


def spec(**kw: object) -> VerificationSpec:
    base: dict[str, object] = {
        "interval": 10,
        "hold": 30,
        "timeout": 120,
        "signals": (ERR, LAT),
        "stop_conditions": (STOP,),
        "failure_limit": 2,
        "error_limit": 3,
    }
    base.update(kw)
    return VerificationSpec.model_validate(base)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ok(value: float | None, t: float = 0) -> QueryResult:
    return QueryResult.of(value, at(t))


def err(message: str = "unreachable", t: float = 0) -> QueryResult:
    return QueryResult.failed(message, at(t))


GOOD = {ERR_Q: ok(0.0), LAT_Q: ok(0.1), STOP_Q: ok(0.0)}


def with_(**overrides: QueryResult) -> dict[str, QueryResult]:
    results = dict(GOOD)
    names = {"err": ERR_Q, "lat": LAT_Q, "stop": STOP_Q}
    for key, value in overrides.items():
        results[names[key]] = value
    return results


def run(
    s: VerificationSpec,
    seq: list[tuple[float, Mapping[str, QueryResult]]],
    state: VerificationState | None = None,
) -> tuple[VerificationState, list[MeasurementRecord]]:
    state = state or VerificationState.start(T0)
    all_records: list[MeasurementRecord] = []
    for t, results in seq:
        state, records = step(s, state, at(t), results, RENDERED)
        all_records.extend(records)
    return state, all_records


# --- classification ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (ok(0.0), "pass"),
        (ok(0.01), "pass"),  # range bounds are inclusive
        (ok(0.0100001), "fail"),
        (ok(math.inf), "fail"),
        (ok(None), "inconclusive"),
        (QueryResult(value=math.nan, error=None, at=T0), "inconclusive"),
        (err(), "error"),
        (QueryResult(value=0.0, error="boom", at=T0), "error"),  # an error wins
    ],
)
def test_classify_signal(result: QueryResult, expected: str) -> None:
    assert classify_signal(ERR, result) == expected


def test_classify_signal_min_bound() -> None:
    sig = Signal(name="throughput", query="q", **{"pass": Range(min=10)})
    assert classify_signal(sig, ok(10)) == "pass"
    assert classify_signal(sig, ok(9.99)) == "fail"
    assert classify_signal(sig, ok(-math.inf)) == "fail"


@pytest.mark.parametrize(
    ("result", "halted"),
    [
        (ok(0.2), True),  # inclusive
        (ok(0.9), True),
        (ok(math.inf), True),
        (ok(0.19), False),
        (ok(None), False),
        (QueryResult(value=math.nan, error=None, at=T0), False),
        (err(), False),
    ],
)
def test_classify_stop(result: QueryResult, halted: bool) -> None:
    assert classify_stop(STOP, result) is halted


def test_query_result_nan_is_inconclusive() -> None:
    assert QueryResult.of(math.nan, T0).value is None
    assert QueryResult.of(math.nan, T0).error is None


# --- success and hold --------------------------------------------------------------------


def test_succeeds_after_hold_of_continuous_passing() -> None:
    s = spec(hold=30)
    state, _ = run(s, [(0, GOOD), (10, GOOD), (20, GOOD)])
    assert state.outcome is None
    assert state.passing_since == at(0)
    state, records = run(s, [(30, GOOD)], state)
    assert state.outcome == "succeeded"
    assert state.ended_at == at(30)
    assert state.any_pass
    assert state.measurements == 12 and state.intervals == 4
    assert {r.name for r in records} == {"error_rate", "latency", "error_spike"}


def test_hold_zero_needs_one_interval_where_every_signal_passed() -> None:
    s = spec(hold=0)
    state, _ = run(s, [(0, with_(lat=ok(None)))])
    assert state.outcome is None  # error_rate passed, latency silent: no evidence
    state, _ = run(s, [(10, with_(err=ok(0.5), lat=ok(0.1)))], state)
    assert state.outcome is None  # latency passed, error_rate failed
    state, _ = run(s, [(20, GOOD)], state)
    assert state.outcome == "succeeded"
    assert state.ended_at == at(20)


def test_hold_zero_first_interval_passing_succeeds_immediately() -> None:
    state, _ = run(spec(hold=0), [(0, GOOD)])
    assert state.outcome == "succeeded"


def test_silent_signal_never_succeeds() -> None:
    s = spec(hold=0, timeout=60)
    seq = [(t, with_(err=ok(None))) for t in range(0, 70, 10)]
    state, records = run(s, seq)
    assert state.outcome == "timeout"
    assert not any(r.outcome == "pass" and r.name == "error_rate" for r in records)
    assert state.failures == 0
    assert state.consecutive_errors == {}


def test_all_signals_silent_never_succeed_and_any_pass_false() -> None:
    s = spec(hold=0, timeout=30)
    silent = with_(err=ok(None), lat=ok(None))
    state, _ = run(s, [(0, silent), (10, silent), (20, silent), (30, silent)])
    assert state.outcome == "timeout"
    assert not state.any_pass


def test_spec_without_signals_never_succeeds() -> None:
    s = spec(signals=(), hold=0, timeout=20)
    state, records = run(s, [(0, GOOD), (10, GOOD)])
    assert state.outcome is None
    assert [r.kind for r in records] == ["stop_condition", "stop_condition"]
    state, _ = run(s, [(20, GOOD)], state)
    assert state.outcome == "timeout"
    assert "no signals" in state.detail


@pytest.mark.parametrize(
    "bad",
    [
        with_(err=ok(0.5)),  # fail
        with_(lat=ok(None)),  # inconclusive
        with_(err=err()),  # error
    ],
    ids=["fail", "inconclusive", "error"],
)
def test_any_non_pass_resets_hold(bad: dict[str, QueryResult]) -> None:
    s = spec(hold=30, timeout=300)
    state, _ = run(s, [(0, GOOD), (10, GOOD), (20, GOOD), (25, bad)])
    assert state.passing_since is None
    assert remaining_hold(s, state, at(25)) == 30
    state, _ = run(s, [(30, GOOD), (40, GOOD), (50, GOOD)], state)
    assert state.outcome is None  # 20s of passing since the reset, not 50
    assert state.passing_since == at(30)
    state, _ = run(s, [(60, GOOD)], state)
    assert state.outcome == "succeeded"


def test_stop_condition_does_not_affect_hold() -> None:
    s = spec(hold=20)
    state, _ = run(s, [(0, GOOD), (10, with_(stop=ok(None))), (20, with_(stop=err()))])
    assert state.outcome == "succeeded"


def test_remaining_hold_live_view() -> None:
    s = spec(hold=30)
    state = VerificationState.start(T0)
    assert remaining_hold(s, state, at(0)) == 30
    state, _ = run(s, [(0, GOOD), (10, GOOD)], state)
    assert remaining_hold(s, state, at(10)) == 20
    assert remaining_hold(s, state, at(15)) == 15
    assert remaining_hold(s, state, at(99)) == 0
    state, _ = run(s, [(30, GOOD)], state)
    assert state.outcome == "succeeded"
    assert remaining_hold(s, state, at(30)) == 0


# --- failures -----------------------------------------------------------------------------


def test_failure_limit_equal_is_tolerated_more_fails() -> None:
    s = spec(failure_limit=2, hold=60, timeout=600)
    bad = with_(err=ok(0.05))
    state, _ = run(s, [(0, bad), (10, GOOD), (20, bad)])
    assert state.failures == 2
    assert state.outcome is None  # == failure_limit: tolerated
    state, records = run(s, [(30, bad)], state)
    assert state.failures == 3
    assert state.outcome == "failed_verification"
    assert state.decided_by == "error_rate"
    assert state.decided_kind == "signal"
    assert state.decided_value == pytest.approx(0.05)
    assert records[-2].outcome == "fail"  # error_rate record of the deciding interval


def test_failure_limit_zero_fails_on_first_failure() -> None:
    state, _ = run(spec(failure_limit=0), [(0, with_(lat=ok(2.0)))])
    assert state.outcome == "failed_verification"
    assert state.decided_by == "latency"


def test_failures_are_counted_per_measurement_across_signals() -> None:
    s = spec(failure_limit=1)
    state, _ = run(s, [(0, with_(err=ok(0.5), lat=ok(9.0)))])
    assert state.failures == 2
    assert state.outcome == "failed_verification"
    assert state.decided_by == "error_rate"  # the first failing signal in spec order


def test_failures_are_not_reset_by_passing() -> None:
    s = spec(failure_limit=1, hold=1000, timeout=1000)
    bad = with_(err=ok(0.5))
    state, _ = run(s, [(0, bad), (10, GOOD), (20, GOOD), (30, GOOD)])
    assert state.outcome is None
    state, _ = run(s, [(40, bad)], state)
    assert state.outcome == "failed_verification"


def test_inconclusive_counts_neither_as_failure_nor_error() -> None:
    s = spec(failure_limit=0, error_limit=0, timeout=1000)
    silent = with_(err=ok(None), stop=ok(None))
    state, _ = run(s, [(t, silent) for t in range(0, 100, 10)])
    assert state.outcome is None
    assert state.failures == 0 and state.consecutive_errors == {}


# --- provider errors ----------------------------------------------------------------------


def test_error_limit_boundaries() -> None:
    s = spec(error_limit=3, timeout=1000)
    down = {ERR_Q: err(), LAT_Q: err(), STOP_Q: err()}
    state, _ = run(s, [(0, down), (10, down), (20, down)])
    assert state.outcome is None  # 3 consecutive == error_limit: tolerated
    assert state.consecutive_errors == {"error_spike": 3, "error_rate": 3, "latency": 3}
    state, _ = run(s, [(30, down)], state)
    assert state.outcome == "provider_errors"  # 4 > 3
    assert state.decided_by == "error_spike"  # stop conditions are measured first
    assert state.decided_value is None
    assert "unreachable" in state.detail
    assert state.failures == 0  # errors are not failures


def test_error_streak_resets_on_an_answer() -> None:
    s = spec(error_limit=1, timeout=1000)
    e = with_(err=err())
    state, _ = run(s, [(0, e), (10, with_(err=ok(None))), (20, e), (30, GOOD), (40, e)])
    assert state.outcome is None
    assert state.consecutive_errors == {"error_rate": 1}
    state, _ = run(s, [(50, e)], state)
    assert state.outcome == "provider_errors"
    assert state.decided_by == "error_rate"


def test_error_streaks_are_per_name() -> None:
    # Alternating errors between two signals never build a streak over the limit,
    # but every interval has a non-pass, so hold is never reached: timeout.
    s = spec(error_limit=1, hold=10, timeout=60)
    a, b = with_(err=err()), with_(lat=err())
    state, _ = run(s, [(0, a), (10, b), (20, a), (30, b), (40, a), (50, b)])
    assert state.outcome is None
    state, _ = run(s, [(60, a)], state)
    assert state.outcome == "timeout"


def test_error_limit_zero_fails_on_first_error() -> None:
    state, _ = run(spec(error_limit=0), [(0, with_(lat=err("HTTP 400: parse error")))])
    assert state.outcome == "provider_errors"
    assert state.decided_by == "latency"
    assert "parse error" in state.detail


def test_stop_condition_errors_count_against_error_limit() -> None:
    s = spec(error_limit=1, hold=1000, timeout=1000)
    state, _ = run(s, [(0, with_(stop=err())), (10, with_(stop=err()))])
    assert state.outcome == "provider_errors"
    assert state.decided_kind == "stop_condition"


def test_missing_result_or_rendering_is_an_error() -> None:
    s = spec(error_limit=0)
    state, records = step(s, VerificationState.start(T0), T0, {LAT_Q: ok(0.1)}, RENDERED)
    assert state.outcome == "provider_errors"
    assert {r.name: r.outcome for r in records} == {
        "error_spike": "error",
        "error_rate": "error",
        "latency": "pass",
    }
    state, records = step(s, VerificationState.start(T0), T0, GOOD, {"latency": LAT_Q})
    assert state.outcome == "provider_errors"
    assert "no rendered query" in records[0].detail


# --- stop conditions ----------------------------------------------------------------------


def test_stop_condition_beats_passing_signals_in_same_interval() -> None:
    s = spec(hold=0)  # the signals alone would succeed in this very interval
    state, records = run(s, [(0, with_(stop=ok(0.25)))])
    assert state.outcome == "stopped"
    assert state.decided_by == "error_spike"
    assert state.decided_kind == "stop_condition"
    assert state.decided_value == pytest.approx(0.25)
    assert "halt range" in state.detail
    stop_rec = next(r for r in records if r.name == "error_spike")
    assert stop_rec.outcome == "fail" and stop_rec.kind == "stop_condition"
    # The signals measured in the same interval are still evidence.
    assert [r.outcome for r in records if r.kind == "signal"] == ["pass", "pass"]


def test_stop_condition_beats_failure_limit_and_timeout() -> None:
    s = spec(failure_limit=0, hold=10, timeout=10)
    state, _ = run(s, [(10, with_(err=ok(0.5), stop=ok(0.5)))])
    assert state.outcome == "stopped"


def test_one_measurement_in_halt_range_halts_at_any_time() -> None:
    s = spec(hold=1000, timeout=1000)
    state, _ = run(s, [(t, GOOD) for t in range(0, 50, 10)])
    assert state.outcome is None
    state, _ = run(s, [(50, with_(stop=ok(0.2)))], state)
    assert state.outcome == "stopped"
    assert state.ended_at == at(50)


def test_first_halting_stop_condition_in_spec_order_decides() -> None:
    other_q = "other"
    other = StopCondition(name="latency_spike", query=other_q, halt=Range(min=1))
    s = spec(stop_conditions=(STOP, other))
    rendered = {**RENDERED, "latency_spike": other_q}
    results = {**with_(stop=ok(0.3)), other_q: ok(5.0)}
    state, _ = step(s, VerificationState.start(T0), T0, results, rendered)
    assert state.decided_by == "error_spike"


# --- timeout ------------------------------------------------------------------------------


def test_timeout_when_hold_not_reached() -> None:
    s = spec(hold=30, timeout=60)
    # passes from t=40: 20s of hold at the deadline
    seq = [(0, with_(err=ok(0.02))), (10, with_(err=ok(None))), (20, with_(err=ok(None)))]
    seq += [(30, with_(err=ok(None))), (40, GOOD), (50, GOOD)]
    state, _ = run(s, seq)
    assert state.outcome is None
    state, _ = run(s, [(60, GOOD)], state)
    assert state.outcome == "timeout"
    assert state.decided_by is None
    assert state.ended_at == at(60)
    assert "passing for 20s" in state.detail


def test_success_at_the_deadline_wins_over_timeout() -> None:
    s = spec(hold=60, timeout=60)
    state, _ = run(s, [(t, GOOD) for t in range(0, 70, 10)])
    assert state.outcome == "succeeded"


def test_timeout_just_before_deadline_keeps_running() -> None:
    s = spec(hold=30, timeout=60)
    state, _ = run(s, [(59.999, with_(err=ok(None)))])
    assert state.outcome is None
    state, _ = run(s, [(60, with_(err=ok(None)))], state)
    assert state.outcome == "timeout"


# --- immutability and records -------------------------------------------------------------


def test_step_is_pure_and_finished_state_is_inert() -> None:
    s = spec(hold=0)
    start = VerificationState.start(T0)
    snapshot = start.model_dump()
    done, _ = step(s, start, T0, GOOD, RENDERED)
    assert start.model_dump() == snapshot
    assert done.outcome == "succeeded"
    again, more = step(s, done, at(10), with_(stop=ok(1.0)), RENDERED)
    assert again is done and more == []
    with pytest.raises(ValueError):
        done.failures = 5  # type: ignore[misc]


def test_error_counters_do_not_leak_between_states() -> None:
    s = spec(error_limit=5, timeout=1000)
    first, _ = step(s, VerificationState.start(T0), T0, with_(err=err()), RENDERED)
    second, _ = step(s, first, at(10), with_(err=err()), RENDERED)
    assert first.consecutive_errors == {"error_rate": 1}
    assert second.consecutive_errors == {"error_rate": 2}


def test_records_and_measurement_conversion() -> None:
    s = spec()
    _, records = step(s, VerificationState.start(T0), at(5), with_(err=ok(0.5)), RENDERED)
    by_name = {r.name: r for r in records}
    assert by_name["error_rate"].outcome == "fail"
    assert by_name["error_rate"].value == 0.5
    assert "outside pass range <= 0.01" in by_name["error_rate"].detail
    assert by_name["latency"].detail == "0.1 within pass range [0, 0.5]"
    assert by_name["error_spike"].outcome == "pass"
    assert all(r.at == at(5) for r in records)
    m = by_name["error_rate"].to_measurement("01JACTION", phase="rollback")
    assert (m.action_id, m.phase, m.name, m.kind, m.outcome, m.value) == (
        "01JACTION",
        "rollback",
        "error_rate",
        "signal",
        "fail",
        0.5,
    )


def test_state_round_trips_through_json() -> None:
    s = spec(timeout=1000)
    state, _ = run(s, [(0, GOOD), (10, with_(lat=err()))])
    restored = VerificationState.model_validate_json(state.model_dump_json())
    assert restored == state


def test_a_tick_a_few_ms_early_still_completes_the_hold_but_a_real_gap_does_not() -> None:
    s = spec(interval=1, hold=10, timeout=60)
    early = [(t, GOOD) for t in range(10)] + [(9.995, GOOD)]
    state, _ = run(s, early)
    assert state.outcome == "succeeded"  # 5 ms short of 10 s: timer slack, not a gap
    short = [(t, GOOD) for t in range(10)] + [(9.9, GOOD)]
    state, _ = run(s, short)
    assert state.outcome is None  # 100 ms short: hold not reached
