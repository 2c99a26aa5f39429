"""Every embedded evaluation has a deadline; past it the decision denies and the worker dies."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from opsgate.config import Settings
from opsgate.errors import ConfigError
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.policies.engine import DECISION_RULE, UNAVAILABLE
from opsgate.policies.sandbox import Payload, SandboxError, WorkerPool

# The hang: rego-cpp's replace() with an empty pattern never returns.
HANGS_ON_EMPTY_PATTERN = """package opsgate
import rego.v1
deny contains {"code": "bad_reason", "message": "m"} if {
    replace(input.action.reason, input.action.params.x, "") == "forbidden"
}
decision := {"allow": count(deny) == 0, "deny": deny, "required_approvals": 1,
             "approver_roles": ["sre"]}
"""

PRINTS = """package opsgate
import rego.v1
deny contains {"code": "never", "message": "m"} if {
    print("policy says hello on stdout")
    false
}
decision := {"allow": count(deny) == 0, "deny": deny, "required_approvals": 1}
"""

TIMEOUT = 0.4


def bundle(tmp_path: Path, source: str) -> Path:
    (tmp_path / "opsgate.rego").write_text(source)
    (tmp_path / "data.json").write_text("{}")
    return tmp_path


def proposal(x: str) -> dict[str, object]:
    return {"action": {"reason": "p99 over SLO", "params": {"x": x}}}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_hanging_builtin_is_a_bounded_deny_and_the_next_decision_works(
    tmp_path: Path,
) -> None:
    with EmbeddedEngine(bundle(tmp_path, HANGS_ON_EMPTY_PATTERN), timeout=TIMEOUT) as engine:
        assert engine.evaluate(DECISION_RULE, proposal("SLO")).allow
        [worker] = engine._pool.pids()

        start = time.monotonic()
        result = engine.evaluate(DECISION_RULE, proposal(""))
        elapsed = time.monotonic() - start

        assert not result.allow and result.deny_codes == [UNAVAILABLE]
        assert "exceeded its deadline" in result.deny[0]["message"]
        # The budget plus the kill and reap; nowhere near "forever".
        assert elapsed < TIMEOUT + 1.0, elapsed
        assert not alive(worker), "the hung worker must be killed, not left spinning"
        assert engine.timeouts == 1 and engine.describe()["timeouts"] == 1
        assert engine.failures == 1

        # Healthy for the next decision, in a fresh worker.
        after = engine.evaluate(DECISION_RULE, proposal("SLO"))
        assert after.allow, after
        assert engine._pool.pids() and worker not in engine._pool.pids()


def test_concurrent_hangs_do_not_block_other_decisions_for_long(tmp_path: Path) -> None:
    engine = EmbeddedEngine(bundle(tmp_path, HANGS_ON_EMPTY_PATTERN), timeout=TIMEOUT, workers=2)
    results: list[bool] = []

    def hang() -> None:
        results.append(engine.evaluate(DECISION_RULE, proposal("")).allow)

    threads = [threading.Thread(target=hang) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == [False, False, False]
    assert engine.evaluate(DECISION_RULE, proposal("SLO")).allow
    engine.close()


def test_close_ends_every_worker_and_then_denies(tmp_path: Path) -> None:
    engine = EmbeddedEngine(bundle(tmp_path, HANGS_ON_EMPTY_PATTERN), timeout=TIMEOUT)
    assert engine.evaluate(DECISION_RULE, proposal("a")).allow
    pids = engine._pool.pids()
    assert pids
    engine.close()
    assert not any(alive(p) for p in pids)
    result = engine.evaluate(DECISION_RULE, proposal("a"))
    assert not result.allow and result.deny_codes == [UNAVAILABLE]


def test_a_dropped_engine_ends_its_workers(tmp_path: Path) -> None:
    engine = EmbeddedEngine(bundle(tmp_path, HANGS_ON_EMPTY_PATTERN), timeout=TIMEOUT)
    assert engine.evaluate(DECISION_RULE, proposal("a")).allow
    pids = engine._pool.pids()
    del engine
    import gc

    gc.collect()
    assert pids and not any(alive(p) for p in pids)


def test_a_crashing_worker_denies_and_is_replaced(tmp_path: Path) -> None:
    with EmbeddedEngine(bundle(tmp_path, HANGS_ON_EMPTY_PATTERN), timeout=5.0) as engine:
        assert engine.evaluate(DECISION_RULE, proposal("a")).allow
        [worker] = engine._pool.pids()
        os.kill(worker, 9)
        crashed = engine.evaluate(DECISION_RULE, proposal("a"))
        # Whether the write to its pipe or the read of its answer notices first is a race.
        error = crashed.error or ""
        assert crashed.deny_codes == [UNAVAILABLE]
        assert "worker died" in error or "worker is gone" in error
        assert "exceeded its deadline" not in crashed.deny[0]["message"]
        assert engine.describe()["worker_crashes"] == 1
        assert engine.evaluate(DECISION_RULE, proposal("a")).allow


def test_rego_print_never_reaches_stdout(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with EmbeddedEngine(bundle(tmp_path, PRINTS), timeout=5.0) as engine:
        result = engine.evaluate(DECISION_RULE, {})
    assert result.allow, result
    out, _ = capfd.readouterr()
    assert "hello" not in out


def test_an_input_that_is_not_json_denies(tmp_path: Path) -> None:
    with EmbeddedEngine(bundle(tmp_path, HANGS_ON_EMPTY_PATTERN), timeout=5.0) as engine:
        result = engine.evaluate(DECISION_RULE, {"action": {"reason": object()}})
        assert result.deny_codes == [UNAVAILABLE]
        assert engine.evaluate(DECISION_RULE, proposal("a")).allow


def test_a_bundle_the_worker_cannot_load_denies() -> None:
    pool = WorkerPool(size=1, timeout=5.0)
    try:
        broken = Payload("r1", (("x.rego", "package opsgate\nthis is not rego\n"),), {}, ())
        with pytest.raises(SandboxError):
            pool.evaluate(broken, DECISION_RULE, {})
    finally:
        pool.close()


@pytest.mark.parametrize("value", ["0", "-1s", "soon"])
def test_the_budget_must_be_a_positive_duration(value: str) -> None:
    with pytest.raises(ConfigError, match="OPSGATE_POLICY_TIMEOUT"):
        Settings.load(env={"OPSGATE_POLICY_TIMEOUT": value}, toml_path=Path("/nonexistent"))


def test_the_budget_is_configurable() -> None:
    settings = Settings.load(env={"OPSGATE_POLICY_TIMEOUT": "250ms"}, toml_path=Path("/nx"))
    assert settings.policy_timeout == pytest.approx(0.25)
    assert Settings().policy_timeout < 1.0


def test_a_proposal_cut_at_the_deadline_is_blocked_audited_and_counted(tmp_path: Path) -> None:
    from opsgate.audit import verify_chain
    from opsgate.catalog import load_catalog
    from opsgate.gate import Gate
    from opsgate.models import ActionState, Identity
    from opsgate.reports.exporter import StoreCollector
    from opsgate.store import open_store

    root = Path(__file__).resolve().parents[2]
    # The shipped policy plus the hang: replace() with an empty pattern, which
    # here a sev1 incident selects (the catalog would refuse an empty param).
    policies = tmp_path / "policies"
    policies.mkdir()
    for name in ("opsgate.rego", "data.json"):
        (policies / name).write_bytes((root / "policies" / name).read_bytes())
    (policies / "hang.rego").write_text(
        "package opsgate\nimport rego.v1\n"
        'pattern := "" if input.incident.severity == "sev1"\nelse := "-"\n'
        'deny contains {"code": "bad_reason", "message": "m"} if {\n'
        '    replace(input.action.reason, pattern, "") == "z"\n'
        "}\n"
    )
    store = open_store(f"sqlite:///{tmp_path / 'opsgate.db'}")
    store.migrate()
    engine = EmbeddedEngine(policies, timeout=TIMEOUT)
    try:
        gate = Gate(store=store, catalog=load_catalog(root / "catalog"), engine=engine)
        document = {
            "action": "toggle_feature_flag",
            "target": "checkout",
            "environment": "prod",
            "params": {"flag": "new-checkout", "enabled": True},
            "reason": "p99 latency over SLO",
            "incident": {"id": "INC-1", "severity": "sev2", "class": "x", "tier": "standard"},
        }
        alice = Identity(id="alice", kind="human")
        fine = gate.propose(document, alice)
        assert fine.action.state is ActionState.PENDING_APPROVAL, fine.decision.deny_codes
        sev1 = {**document["incident"], "severity": "sev1"}  # type: ignore[dict-item]
        hung = gate.propose({**document, "incident": sev1}, alice)
        assert hung.action.state is ActionState.BLOCKED
        assert hung.decision.deny_codes == [UNAVAILABLE]
        assert "exceeded its deadline" in hung.decision.deny[0].message
        assert verify_chain(store.audit_events(), store.audit_head()).ok
        kinds = [e.kind for e in store.audit_events(action_id=hung.action.id)]
        assert kinds, "the blocked proposal and its decision are audited"
        # The next proposal is decided normally, and the metric counts the cut one.
        assert gate.propose(document, alice).action.state is ActionState.PENDING_APPROVAL
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in StoreCollector(store).collect()
            for s in family.samples
        }
        assert samples[("opsgate_policy_deadline_exceeded_total", (("phase", "propose"),))] == 1
    finally:
        engine.close()
        store.close()


# An array of 300 million numbers: regopy passes 900 MiB within a second.
MEMORY_BOMB = """package opsgate
import rego.v1
deny contains {"code": "big", "message": "m"} if {
    input.big == true
    count(numbers.range(1, 300000000)) > 0
}
decision := {"allow": count(deny) == 0, "deny": [d | some d in deny], "required_approvals": 1}
"""


def test_a_worker_over_its_memory_cap_is_killed_before_the_deadline(tmp_path: Path) -> None:
    cap = 200 * 1024 * 1024
    with EmbeddedEngine(bundle(tmp_path, MEMORY_BOMB), timeout=20.0, max_memory=cap) as engine:
        assert engine.evaluate(DECISION_RULE, {"big": False}).allow
        [worker] = engine._pool.pids()
        start = time.monotonic()
        result = engine.evaluate(DECISION_RULE, {"big": True})
        assert time.monotonic() - start < 10.0
        assert result.deny_codes == [UNAVAILABLE]
        assert "used more than 200 MiB" in (result.error or ""), result.error
        # Not a deadline: the metric of cut decisions does not count it.
        assert "exceeded its deadline" not in result.deny[0]["message"]
        assert not alive(worker) and engine.timeouts == 0
        assert engine.evaluate(DECISION_RULE, {"big": False}).allow


ALLOWS = """package opsgate
import rego.v1
decision := {"allow": true, "deny": [], "required_approvals": 1, "approver_roles": ["sre"]}
"""


def test_a_warm_evaluation_needs_a_loaded_worker_and_never_starts_one(tmp_path: Path) -> None:
    with EmbeddedEngine(bundle(tmp_path, HANGS_ON_EMPTY_PATTERN), timeout=TIMEOUT) as engine:
        assert engine.evaluate_warm(DECISION_RULE, proposal("SLO")) is None
        assert engine._pool.pids() == []  # nothing was started for it
        usual = engine.evaluate(DECISION_RULE, proposal("SLO"))
        warm = engine.evaluate_warm(DECISION_RULE, proposal("SLO"))
        assert warm == usual and warm.allow
        assert engine.evaluations == 2
        # Busy (checked out by another evaluation): no waiting for it either.
        [worker] = engine._pool._idle
        engine._pool._idle.clear()
        try:
            assert engine.evaluate_warm(DECISION_RULE, proposal("SLO")) is None
        finally:
            engine._pool._checkin(worker)


def test_a_hang_on_the_warm_path_is_cut_at_the_same_deadline(tmp_path: Path) -> None:
    with EmbeddedEngine(bundle(tmp_path, HANGS_ON_EMPTY_PATTERN), timeout=TIMEOUT) as engine:
        assert engine.evaluate(DECISION_RULE, proposal("SLO")).allow
        [worker] = engine._pool.pids()
        start = time.monotonic()
        result = engine.evaluate_warm(DECISION_RULE, proposal(""))
        elapsed = time.monotonic() - start
        assert result is not None and result.deny_codes == [UNAVAILABLE]
        assert "exceeded its deadline" in result.deny[0]["message"]
        assert elapsed < TIMEOUT + 1.0, elapsed
        assert not alive(worker)
        assert engine.timeouts == 1 and engine.failures == 1
        # The killed worker is not replaced on the warm path: the usual one does that.
        assert engine.evaluate_warm(DECISION_RULE, proposal("SLO")) is None
        assert engine.evaluate(DECISION_RULE, proposal("SLO")).allow


def test_a_warm_evaluation_leaves_a_due_reload_to_the_usual_path(tmp_path: Path) -> None:
    directory = bundle(tmp_path, HANGS_ON_EMPTY_PATTERN)
    with EmbeddedEngine(directory, timeout=TIMEOUT) as engine:
        before = engine.evaluate(DECISION_RULE, proposal("SLO"))
        (directory / "opsgate.rego").write_text(ALLOWS)
        engine._checked_at -= 60  # the reload check is due
        assert engine.evaluate_warm(DECISION_RULE, proposal("")) is None
        # The usual path reloads: the new bundle answers, with its own revision.
        after = engine.evaluate(DECISION_RULE, proposal(""))
        assert after.allow and after.revision != before.revision
        # That evaluation loaded the new bundle into the worker: warm again, on it.
        warm = engine.evaluate_warm(DECISION_RULE, proposal(""))
        assert warm is not None and warm.revision == after.revision
