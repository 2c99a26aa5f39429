"""The verification hub: one provider call per tick, each distinct query sent once."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest

from opsgate.models import VerificationSpec
from opsgate.testing_signals import StaticSignalProvider
from opsgate.verification.evaluator import VerificationState
from opsgate.verification.hub import TickReport, VerificationHub, Watch, stop_only

SPEC = VerificationSpec.model_validate(
    {
        "interval": "0.05s",
        "hold": "0.1s",
        "timeout": "5s",
        "signals": [{"name": "error_rate", "query": "placeholder", "pass": {"max": 0.01}}],
        "stop_conditions": [{"name": "error_spike", "query": "placeholder", "halt": {"min": 0.2}}],
    }
)


def watch_for(service: str, done: list[Watch]) -> Watch:
    query = f'err{{service="{service}"}}'
    return Watch(
        action_id=service,
        phase="verify",
        spec=SPEC,
        rendered={"error_rate": query, "error_spike": query},
        state=VerificationState.start(datetime.now(UTC)),
        on_done=done.append,
    )


def test_identical_queries_across_actions_are_sent_once_per_tick() -> None:
    provider = StaticSignalProvider(default=0.001)
    reports: list[TickReport] = []
    hub = VerificationHub(provider, sink=reports.append)
    done: list[Watch] = []
    # 300 actions on 3 services: 3 distinct queries, whatever the number of actions.
    watches = [watch_for(f"svc-{i % 3}", done) for i in range(300)]
    for watch in watches:
        hub.watch(watch)
    try:
        assert all(w.done.wait(5) for w in watches)
    finally:
        hub.close()
    assert len(done) == 300 and all(w.state.succeeded for w in watches)
    assert reports and all(r.queries_sent <= 3 for r in reports)
    # Every call to the provider asked each distinct query once.
    assert len(provider.calls) == sum(r.queries_sent for r in reports)
    measuring = [r for r in reports if len(r.watches) == 300]
    assert measuring, "the watches should have come due together on the interval grid"


def test_abort_ends_a_watch_at_once_without_measuring() -> None:
    provider = StaticSignalProvider(default=0.001)
    hub = VerificationHub(provider)
    done: list[Watch] = []
    slow = watch_for("checkout", done)
    slow.spec = SPEC.model_copy(update={"interval": 30.0})
    hub.watch(slow)
    try:
        hub.abort(slow, "manual")
        assert slow.done.wait(5)
    finally:
        hub.close()
    assert done == [slow] and slow.abort_reason == "manual"
    assert slow.state.intervals == 0 and provider.calls == []


def test_the_run_phase_watches_stop_conditions_only() -> None:
    spec = stop_only(SPEC)
    assert spec.signals == () and spec.stop_conditions == SPEC.stop_conditions
    provider = StaticSignalProvider(default=0.5)
    hub = VerificationHub(provider)
    fired = threading.Event()
    watch = watch_for("checkout", [])
    watch.phase, watch.spec, watch.on_done = "run", spec, lambda _w: fired.set()
    hub.watch(watch)
    try:
        assert fired.wait(5)
    finally:
        hub.close()
    assert watch.state.outcome == "stopped" and watch.state.decided_by == "error_spike"
    assert [r.kind for r in watch.last_records] == ["stop_condition"]


def test_a_tick_judges_evidence_by_when_the_queries_were_asked() -> None:
    """The answer may come back after `evidence_from`, but the query was evaluated on a
    window that started before it: not counted."""
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    moments = iter([t0, t0.replace(second=5)])  # asked at :00, answered at :05

    provider = StaticSignalProvider(default=0.001)
    hub = VerificationHub(provider, clock=lambda: next(moments))
    query = 'err{service="s"}'
    watch = Watch(
        action_id="a",
        phase="verify",
        spec=SPEC,
        rendered={"error_rate": query, "error_spike": query},
        state=VerificationState.start(t0, evidence_from=t0.replace(second=2)),
    )
    hub.tick([watch])
    signal = [r for r in watch.last_records if r.kind == "signal"]
    assert signal[0].not_counted == "pre_change" and signal[0].at == t0.replace(second=5)
    assert watch.state.passing_since is None


def test_the_sink_is_fixed_when_the_hub_is_built() -> None:
    reports: list[TickReport] = []
    hub = VerificationHub(StaticSignalProvider(default=0.001), sink=reports.append)
    with pytest.raises(AttributeError):
        hub.sink = None  # type: ignore[misc]
    watch = watch_for("checkout", [])
    hub.tick([watch])
    assert [r.watches for r in reports] == [[watch]]
