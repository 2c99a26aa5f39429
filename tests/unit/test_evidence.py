"""Post-change evidence: the look-back of PromQL queries, the counting rule in the
evaluator, the scrape interval read from a Prometheus configuration, the catalog lint,
and a simulated Prometheus proving that no counted measurement reads a pre-change
sample, whatever the phases of scrapes, ticks and query delays."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from opsgate.catalog import load_catalog
from opsgate.errors import InvalidInput
from opsgate.models import ActionType, Range, Signal, StopCondition, VerificationSpec
from opsgate.verification.evaluator import VerificationState, evidence_wait, step
from opsgate.verification.lint import lint_verification
from opsgate.verification.lookback import (
    evidence_floor,
    parse_promql_duration,
    query_lookback,
)
from opsgate.verification.prometheus import scrape_interval_of
from opsgate.verification.provider import QueryResult

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- look-back ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "seconds"),
    [
        ("up", 0),
        ('up{job="api"}', 0),
        ("rate(x[5m])", 300),
        ("rate(x[90s])", 90),
        ("x[300]", 300),
        ("rate(x[1h30m])", 5400),
        ("rate(x[250ms])", 0.25),
        ("rate(x[5m] offset 1m)", 360),
        ("x offset 1h", 3600),
        ("x offset -5m", 0),  # a negative offset reads later samples, not earlier ones
        ("max_over_time(rate(x[1m])[10m:30s])", 660),
        ("max_over_time(x[5m:])", 300),
        ("sum(rate(x[1m])) by (job)", 60),
        ("sum(rate(x[1m])) by (job)[5m:1m]", 360),
        ("sum by (job) (rate(x[1m]))[5m:1m] offset 2m", 480),
        ("a[1m] / b[3m]", 180),
        ("histogram_quantile(0.99, sum by (le) (rate(h_bucket[2m])))", 120),
        ("rate(x[5m] @ end())", 300),
        ("rate(job:x:rate1m[2m])", 120),
        # brackets inside strings and comments are not ranges
        ('rate(x{path="/a[1h]"}[1m])', 60),
        ("# an old [1d] window\nrate(x[1m])", 60),
        (
            'sum(rate(http_requests_total{service="{target}",code=~"5.."}[4s]))'
            ' / sum(rate(http_requests_total{service="{target}"}[4s]))',
            4,
        ),
    ],
)
def test_lookback_of_queries(query: str, seconds: float) -> None:
    assert query_lookback(query) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("x @ 1609746000", "fixed time"),
        ("rate(x[5m] @ 1609746000)", "fixed time"),
        ("rate(x[5m)", "unclosed"),
        ("rate(x[foo])", "literal duration"),
        ("rate(x[5m+1m])", "unsupported range"),
        ("x offset foo", "offset needs"),
        ("rate(x[5m]) ; drop", "cannot read"),
        ("[5m]", "nothing before"),
    ],
)
def test_queries_whose_lookback_cannot_be_bounded_are_refused(query: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        query_lookback(query)


def test_a_signal_with_an_unbounded_query_is_invalid() -> None:
    with pytest.raises(ValidationError, match="fixed time"):
        Signal.model_validate({"name": "e", "query": "x @ 1609746000", "pass": {"max": 1}})


@pytest.mark.parametrize(
    ("text", "seconds"), [("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("1w", 604800)]
)
def test_promql_durations(text: str, seconds: float) -> None:
    assert parse_promql_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "m5", "5x", "1m5"])
def test_bad_promql_durations(text: str) -> None:
    if text == "5":
        assert parse_promql_duration(text) == 5  # a plain number is seconds
        return
    with pytest.raises(ValueError):
        parse_promql_duration(text)


def test_the_floor_is_the_longest_window_plus_one_scrape() -> None:
    assert evidence_floor(["rate(a[1m])", "rate(b[2m] offset 30s)", "up"], 15) == 165
    assert evidence_floor(["up"], 15) == 15  # an instant selector needs one new scrape
    assert evidence_floor([], 15) == 15


# --- the counting rule in the evaluator --------------------------------------------------

Q = "rate(errors[1m])"
STOP_Q = "rate(errors[1m]) * 2"
SIGNAL = Signal.model_validate({"name": "error_rate", "query": Q, "pass": {"max": 0.01}})
STOP = StopCondition(name="error_spike", query=STOP_Q, halt=Range(min=0.5))
RENDERED = {"error_rate": Q, "error_spike": STOP_Q}


def spec(**kw: object) -> VerificationSpec:
    base: dict[str, object] = {
        "interval": 10,
        "hold": 20,
        "timeout": 300,
        "signals": (SIGNAL,),
        "stop_conditions": (STOP,),
        "failure_limit": 0,
        "error_limit": 1,
    }
    base.update(kw)
    return VerificationSpec.model_validate(base)


def results(value: float | None, stop: float | None = 0.0, t: float = 0) -> dict[str, QueryResult]:
    return {Q: QueryResult.of(value, at(t)), STOP_Q: QueryResult.of(stop, at(t))}


def test_pre_change_measurements_neither_fail_nor_start_hold() -> None:
    s = spec()
    state = VerificationState.start(at(0), evidence_from=at(70))
    for t in (10, 20, 30, 40, 50, 60):  # bad values: failure_limit 0 would end it at once
        state, records = step(s, state, at(t), results(0.5), RENDERED)
        assert state.outcome is None
        (signal,) = [r for r in records if r.kind == "signal"]
        assert signal.not_counted == "pre_change" and signal.outcome == "fail"
        assert "not counted" in signal.detail
    assert state.failures == 0 and state.passing_since is None and not state.any_pass
    state, records = step(s, state, at(70), results(0.5), RENDERED)
    assert state.outcome == "failed_verification"  # the first counted measurement fails


def test_pre_change_passes_never_succeed_however_long_they_last() -> None:
    s = spec(hold=0)
    state = VerificationState.start(at(0), evidence_from=at(1000))
    for t in range(10, 310, 10):
        state, _ = step(s, state, at(t), results(0.0), RENDERED)
    assert state.outcome == "timeout"
    assert "no post-change evidence" in state.detail


def test_hold_starts_at_the_first_counted_pass() -> None:
    s = spec(hold=20)
    state = VerificationState.start(at(0), evidence_from=at(25))
    outcomes = []
    for t in (10, 20, 30, 40, 50):
        state, _ = step(s, state, at(t), results(0.0), RENDERED)
        outcomes.append(state.outcome)
    assert state.passing_since == at(30)
    assert outcomes == [None, None, None, None, "succeeded"]


def test_the_rule_applies_to_when_the_queries_were_asked() -> None:
    """A query asked before `evidence_from` may be evaluated on a pre-change window,
    even if its answer arrives after: it does not count."""
    s = spec()
    state = VerificationState.start(at(0), evidence_from=at(30))
    state, records = step(s, state, at(30.5), results(0.5), RENDERED, asked_at=at(29.9))
    assert state.outcome is None and records[-1].not_counted == "pre_change"
    state, records = step(s, state, at(40.2), results(0.5), RENDERED, asked_at=at(40))
    assert state.outcome == "failed_verification"


def test_stop_conditions_are_watched_from_the_first_second() -> None:
    s = spec()
    state = VerificationState.start(at(0), evidence_from=at(100))
    state, _ = step(s, state, at(10), results(0.0, stop=0.9), RENDERED)
    assert state.outcome == "stopped" and state.decided_by == "error_spike"


def test_errors_count_against_error_limit_while_waiting() -> None:
    s = spec(error_limit=1)
    state = VerificationState.start(at(0), evidence_from=at(100))
    failed = {Q: QueryResult.failed("unreachable", at(0)), STOP_Q: QueryResult.of(0.0, at(0))}
    state, records = step(s, state, at(10), failed, RENDERED)
    assert records[-1].outcome == "error" and records[-1].not_counted is None
    state, _ = step(s, state, at(20), failed, RENDERED)
    assert state.outcome == "provider_errors"


def test_initial_delay_marks_measurements_settling() -> None:
    s = spec(initial_delay=40)
    state = VerificationState.start(at(0), evidence_from=at(15), settled_at=at(40))
    state, records = step(s, state, at(10), results(0.5), RENDERED)
    assert records[-1].not_counted == "pre_change"
    state, records = step(s, state, at(20), results(0.5), RENDERED)
    assert records[-1].not_counted == "settling" and state.outcome is None
    state, records = step(s, state, at(40), results(0.5), RENDERED)
    assert records[-1].not_counted is None and state.outcome == "failed_verification"


def test_evidence_wait_for_a_live_view() -> None:
    state = VerificationState.start(at(0), evidence_from=at(15), settled_at=at(40))
    assert evidence_wait(state, at(5)) == ("pre_change", 10.0)
    assert evidence_wait(state, at(20)) == ("settling", 20.0)
    assert evidence_wait(state, at(40)) == (None, 0.0)
    assert evidence_wait(VerificationState.start(at(0)), at(0)) == (None, 0.0)


def test_a_stored_state_round_trips_with_its_rule() -> None:
    state = VerificationState.start(at(0), evidence_from=at(15), settled_at=at(40))
    again = VerificationState.model_validate(state.model_dump(mode="json"))
    assert again.evidence_from == at(15) and again.settled_at == at(40)


# --- the evidence rule in the catalog ----------------------------------------------------

STEP = {"argv": ["true"]}


def test_evidence_after_run_start_needs_a_reason() -> None:
    with pytest.raises(ValidationError, match="evidence_after_reason"):
        ActionType.model_validate({"name": "a", "run": STEP, "evidence_after": "run_start"})
    typed = ActionType.model_validate(
        {
            "name": "a",
            "run": STEP,
            "evidence_after": "run_start",
            "evidence_after_reason": "the run step is a 20-minute progressive rollout",
        }
    )
    assert typed.evidence_after == "run_start"
    with pytest.raises(ValidationError):
        ActionType.model_validate({"name": "a", "run": STEP, "evidence_after": "never"})


def test_initial_delay_must_be_a_duration() -> None:
    assert spec(initial_delay="2m").initial_delay == 120
    with pytest.raises(ValidationError):
        spec(initial_delay=-1)


# --- the scrape interval Prometheus reports ----------------------------------------------


def test_scrape_interval_is_the_longest_of_global_and_jobs() -> None:
    config = {
        "global": {"scrape_interval": "15s"},
        "scrape_configs": [{"job_name": "a"}, {"job_name": "b", "scrape_interval": "30s"}],
    }
    assert scrape_interval_of(config) == 30
    assert scrape_interval_of({"scrape_configs": [{"job_name": "a"}]}) == 60  # the default
    assert scrape_interval_of({"global": {"scrape_interval": "1s"}}) == 1


@pytest.mark.parametrize(
    "config", [None, [], "x", {"global": {"scrape_interval": "soon"}}, {"global": "x"}]
)
def test_a_malformed_configuration_gives_no_interval(config: object) -> None:
    assert scrape_interval_of(config) is None


# --- the catalog lint ---------------------------------------------------------------------


def test_lint_finds_a_timeout_that_hold_after_the_floor_cannot_meet() -> None:
    findings = lint_verification("t", spec(hold=120, timeout=150), scrape_interval=15)
    assert len(findings) == 1 and findings[0].field == "verification.timeout"
    assert "at least 195s" in findings[0].message  # 60s window + 15s scrape + 120s hold
    assert lint_verification("t", spec(hold=120, timeout=195), scrape_interval=15) == []
    # an initial delay longer than the floor is what counts
    findings = lint_verification(
        "t", spec(hold=10, timeout=100, initial_delay=95), scrape_interval=15
    )
    assert findings and "at least 105s" in findings[0].message


def _write_type(directory: Path, timeout: str) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "t.yaml").write_text(
        "name: t\nrun: {argv: ['true']}\nverification:\n"
        f"  interval: 10s\n  hold: 60s\n  timeout: {timeout}\n"
        "  signals:\n    - {name: e, query: 'rate(x[5m])', pass: {max: 1}}\n"
    )


def test_catalog_load_warns_and_strict_refuses(tmp_path: Path) -> None:
    _write_type(tmp_path / "c", "90s")
    loaded = load_catalog(tmp_path / "c", scrape_interval=15)
    assert [w.action_type for w in loaded.warnings] == ["t"]
    with pytest.raises(InvalidInput, match=r"t\.yaml: verification\.timeout"):
        load_catalog(tmp_path / "c", strict=True, scrape_interval=15)
    _write_type(tmp_path / "ok", "10m")
    assert load_catalog(tmp_path / "ok", strict=True, scrape_interval=15).warnings == ()


# --- a simulated Prometheus: counted evidence is post-change, whatever the phases -------

REQUESTS_PER_SECOND = 200.0


def _counters(t: float, change: float, before: float, after: float) -> tuple[float, float]:
    """(errors, total) counters at time t for a service whose error ratio switches at
    `change`."""
    total = REQUESTS_PER_SECOND * t
    if t <= change:
        errors = REQUESTS_PER_SECOND * before * t
    else:
        errors = REQUESTS_PER_SECOND * (before * change + after * (t - change))
    return errors, total


def _ratio(
    eval_at: float, window: float, scrapes: list[float], change: float, before: float, after: float
) -> float | None:
    """Prometheus's `rate(errors[w]) / rate(total[w])` at `eval_at`, from the samples
    scraped inside the window (at least two are needed)."""
    inside = [s for s in scrapes if eval_at - window < s <= eval_at]
    if len(inside) < 2:
        return None
    e0, t0 = _counters(inside[0], change, before, after)
    e1, t1 = _counters(inside[-1], change, before, after)
    return (e1 - e0) / (t1 - t0)


@settings(max_examples=300, deadline=None)
@given(
    window=st.sampled_from([2.0, 4.0, 10.0, 60.0]),
    scrape=st.sampled_from([1.0, 2.0, 5.0, 15.0]),
    interval=st.sampled_from([0.5, 1.0, 5.0, 10.0]),
    scrape_phase=st.floats(0, 1),
    tick_phase=st.floats(0, 1),
    delays=st.lists(st.floats(0, 3.0), min_size=40, max_size=40),
    answer_delays=st.lists(st.floats(0, 3.0), min_size=40, max_size=40),
    run_seconds=st.floats(0.05, 20.0),
)
def test_no_counted_measurement_reads_a_pre_change_sample(
    window: float,
    scrape: float,
    interval: float,
    scrape_phase: float,
    tick_phase: float,
    delays: list[float],
    answer_delays: list[float],
    run_seconds: float,
) -> None:
    """A harmful change (error ratio 0 -> 0.1) with a window longer than hold: every
    measurement that counts sees exactly 0.1, so it can never pass; a healthy-looking
    window only ever shows up as pre-change. Queries reach Prometheus up to 3 s late (a
    loaded machine), Prometheus evaluates each at the moment it receives it, and the
    answer takes up to 3 s more to come back."""
    query = f"rate(errors[{window:g}s]) / rate(total[{window:g}s])"
    signal = Signal.model_validate({"name": "error_rate", "query": query, "pass": {"max": 0.05}})
    verification = VerificationSpec(
        interval=interval, hold=0, timeout=10_000, signals=(signal,), failure_limit=10**6
    )
    run_end = 100.0 + run_seconds  # the change takes effect at run end at the latest
    change = run_end - run_seconds * 0.5
    scrapes = [scrape_phase * scrape + k * scrape for k in range(int(400 / scrape))]
    floor = evidence_floor([query], scrape)
    state = VerificationState.start(at(run_end), evidence_from=at(run_end + floor))
    counted = 0
    for k, (delay, answer_delay) in enumerate(zip(delays, answer_delays, strict=True)):
        asked = run_end + tick_phase * interval + k * interval
        evaluated = asked + delay  # the query reaches Prometheus late
        value = _ratio(evaluated, window, scrapes, change, before=0.0, after=0.1)
        state, records = step(
            verification,
            state,
            at(evaluated + answer_delay),
            {query: QueryResult.of(value, at(evaluated))},
            {"error_rate": query},
            asked_at=at(asked),
        )
        (record,) = records
        if record.not_counted is None and record.value is not None:
            counted += 1
            assert record.value == pytest.approx(0.1), (asked, evaluated, record)
        assert state.outcome != "succeeded"
    if window >= 2 * scrape and 40 * interval > floor + 2 * window + 3:
        assert counted > 0  # the rule waits, it does not stop measuring
