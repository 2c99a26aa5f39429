"""Policy evaluation and live preconditions run outside the store's write lock and under
a deadline: a slow policy or a hung Prometheus neither blocks unrelated approvals with
"database is locked" nor waits forever; past the deadline the decision is a deny."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from opsgate.catalog import load_catalog
from opsgate.gate import Gate
from opsgate.models import ActionState
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.policies.engine import AUTHZ_RULE, PolicyResult
from opsgate.preconditions import CheckContext, PreconditionRegistry, PreconditionResult
from opsgate.store.sql import SqlStore
from tests.unit.executor_rig import ALICE, BOB, ROOT, Rig, scale

S = ActionState


class SlowEngine:
    """The real engine, but an evaluation for target `slow` takes `delay` seconds (a
    pathological regex in the bundle, an OPA server that stalls)."""

    def __init__(self, delay: float, *, every: bool = False) -> None:
        self.inner = EmbeddedEngine(ROOT / "policies")
        self.name = self.inner.name
        self.delay = delay
        self.every = every
        self.release = threading.Event()

    def evaluate(self, rule: str, input: Mapping[str, Any]) -> PolicyResult:
        # Who may propose (authz) is a rule of its own: only the decision is slow here.
        if rule == AUTHZ_RULE and not self.every:
            return self.inner.evaluate(rule, input)
        if self.every or input.get("action", {}).get("target") == "slow":
            self.release.wait(self.delay)
        return self.inner.evaluate(rule, input)

    def revision(self) -> str:
        return self.inner.revision()


def test_a_slow_policy_is_denied_at_the_deadline_and_holds_no_lock(
    tmp_path: Path, sqlite_url: str
) -> None:
    store = SqlStore(sqlite_url)
    engine = SlowEngine(delay=30)
    gate = Gate(
        store=store,
        catalog=load_catalog(ROOT / "catalog"),
        engine=engine,  # type: ignore[arg-type]
        decision_deadline=2.0,
    )
    try:
        other = gate.propose(scale(target="checkout"), ALICE).action.id
        result: dict[str, Any] = {}

        def slow_proposal() -> None:
            started = time.monotonic()
            result["outcome"] = gate.propose(scale(target="slow"), ALICE)
            result["took"] = time.monotonic() - started

        thread = threading.Thread(target=slow_proposal)
        thread.start()
        time.sleep(0.3)  # the slow evaluation is under way
        started = time.monotonic()
        approved = gate.approve(other, BOB)  # an unrelated write, meanwhile
        assert time.monotonic() - started < 1.5
        assert approved.action.state is S.APPROVED
        thread.join(10)
        outcome = result["outcome"]
        assert outcome.action.state is S.BLOCKED
        assert outcome.decision.deny_codes == ["policy_engine_unavailable"]
        assert "no decision within 2s" in (outcome.decision.error or "")
        assert result["took"] < 5
    finally:
        engine.release.set()
        store.close()


def test_a_hung_precondition_is_a_missing_precondition_deny_at_the_deadline(
    tmp_path: Path,
) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    text = (ROOT / "catalog" / "scale_deployment.yaml").read_text()
    (catalog / "scale_deployment.yaml").write_text(text + "\npreconditions: [prometheus_up]\n")
    hang = threading.Event()

    def prometheus_up(ctx: CheckContext) -> PreconditionResult:
        hang.wait(30)  # a Prometheus that accepts the connection and never answers
        return PreconditionResult("prometheus_up", ok=True)

    (tmp_path / "rig").mkdir()
    rig = Rig(tmp_path / "rig")
    gate = Gate(
        store=rig.store,
        catalog=load_catalog(catalog),
        engine=EmbeddedEngine(ROOT / "policies"),
        preconditions=PreconditionRegistry({"prometheus_up": prometheus_up}),
        decision_deadline=1.0,
    )
    try:
        started = time.monotonic()
        outcome = gate.propose(scale(), ALICE)
        assert time.monotonic() - started < 4
        assert outcome.action.state is S.BLOCKED
        assert "missing_precondition" in outcome.decision.deny_codes
        checks = {p["name"]: p for p in outcome.decision.input["preconditions"]}
        assert checks["prometheus_up"]["ok"] is False
        assert "no answer within 1s" in checks["prometheus_up"]["error"]
        # the built-in checks were still decided
        assert checks["concurrent_action"]["ok"] is True
    finally:
        hang.set()
        rig.executor.close()


def test_a_slow_policy_at_claim_blocks_the_run_at_the_deadline(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        action_id = rig.approved()
        slow = SlowEngine(delay=30, every=True)  # from now on, after the approval
        rig.gate.engine = slow  # type: ignore[assignment]
        rig.gate.decision_deadline = 1.0
        started = time.monotonic()
        claimed = rig.executor.claim(action_id)
        assert time.monotonic() - started < 5
        assert claimed is not None and claimed.state is S.BLOCKED_AT_EXECUTION
        assert rig.runner.calls == []
        execute = [d for d in rig.store.decisions_for(action_id) if d.phase == "execute"]
        assert "policy_engine_unavailable" in execute[-1].deny_codes
        slow.release.set()
    finally:
        rig.executor.close()


def test_the_decision_threads_survive_a_hung_evaluation() -> None:
    from opsgate.gate import _DecisionThreads

    deadline = 0.5
    threads = _DecisionThreads(size=2)
    stuck = threading.Event()
    assert threads.run(lambda: stuck.wait(30), deadline) == (False, None)
    assert threads.run(lambda: 42, deadline) == (True, 42)  # the other thread serves
    with pytest.raises(ZeroDivisionError):
        threads.run(lambda: 1 / 0, deadline)
    stuck.set()
    assert threads.run(lambda: "again", deadline) == (True, "again")


class SlowAtExecution(SlowEngine):
    def evaluate(self, rule: str, input: Mapping[str, Any]) -> PolicyResult:
        if input.get("context", {}).get("phase") == "execute":
            self.release.wait(self.delay)
        return self.inner.evaluate(rule, input)


def test_a_slow_recheck_at_claim_holds_no_write_lock(tmp_path: Path, sqlite_url: str) -> None:
    from opsgate.executor.executor import Executor
    from opsgate.executor.runners import RunnerRegistry
    from opsgate.testing_signals import StaticSignalProvider

    store = SqlStore(sqlite_url)
    engine = SlowAtExecution(delay=30)
    gate = Gate(
        store=store,
        catalog=load_catalog(ROOT / "catalog"),
        engine=engine,  # type: ignore[arg-type]
        decision_deadline=3.0,
    )
    executor = Executor(store, gate, StaticSignalProvider({}), RunnerRegistry(), lease=30)
    try:
        to_run = gate.propose(scale(target="checkout"), ALICE).action.id
        gate.approve(to_run, BOB)
        other = gate.propose(scale(target="search"), ALICE).action.id
        result: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.update(claimed=executor.claim(to_run)))
        thread.start()
        time.sleep(0.5)  # the claim's re-check is under way, waiting on the policy
        started = time.monotonic()
        assert gate.approve(other, BOB).action.state is S.APPROVED
        assert time.monotonic() - started < 2.0
        thread.join(15)
        claimed = result["claimed"]
        assert claimed.state is S.BLOCKED_AT_EXECUTION
        execute = [d for d in store.decisions_for(to_run) if d.phase == "execute"]
        assert "policy_engine_unavailable" in execute[-1].deny_codes
    finally:
        engine.release.set()
        executor.close()
        store.close()


def test_a_ready_engine_decides_in_the_callers_thread_and_a_cold_one_on_the_threads(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqlStore(sqlite_url)
    engine = EmbeddedEngine(ROOT / "policies")
    gate = Gate(store=store, catalog=load_catalog(ROOT / "catalog"), engine=engine)
    hops: list[float] = []
    within = gate._within

    def counted(seconds: float, work: Any) -> tuple[bool, Any]:
        hops.append(seconds)
        return within(seconds, work)

    monkeypatch.setattr(gate, "_within", counted)
    try:
        # No worker yet: authz starts one on a decision thread; the policy finds it warm.
        cold = gate.propose(scale(), ALICE)
        assert cold.action.state is S.PENDING_APPROVAL
        assert len(hops) == 1
        hops.clear()
        warm = gate.propose(scale(target="payments"), ALICE)
        assert warm.action.state is S.PENDING_APPROVAL
        assert hops == []  # built-in preconditions, warm engine: no thread switch
        assert warm.decision.bundle_revision == cold.decision.bundle_revision

        # A shadow engine is evaluated beside it on the decision thread, as before.
        gate.shadow = EmbeddedEngine(ROOT / "policies")
        try:
            gate.propose(scale(target="search"), ALICE)
            assert len(hops) == 2
        finally:
            gate.shadow.close()
    finally:
        engine.close()
        store.close()


def test_an_engine_deadline_longer_than_the_gates_keeps_the_decision_thread(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqlStore(sqlite_url)
    engine = EmbeddedEngine(ROOT / "policies", timeout=10.0)
    gate = Gate(
        store=store,
        catalog=load_catalog(ROOT / "catalog"),
        engine=engine,
        decision_deadline=2.0,
    )
    hops: list[float] = []
    within = gate._within

    def counted(seconds: float, work: Any) -> tuple[bool, Any]:
        hops.append(seconds)
        return within(seconds, work)

    monkeypatch.setattr(gate, "_within", counted)
    try:
        gate.propose(scale(), ALICE)
        hops.clear()
        gate.propose(scale(target="payments"), ALICE)
        assert len(hops) == 2  # the engine cannot promise an answer within 2 s
    finally:
        engine.close()
        store.close()
