"""An agent up the trust ladder and down it, through real runs: real PostgreSQL, a real
Prometheus scraping the fault service, the real shell runner and the shipped Rego bundle
(with the ladder's N lowered to 2 in a copy of its data, so the test needs few runs)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from opsgate.catalog import load_catalog
from opsgate.errors import Refused
from opsgate.executor.executor import Executor
from opsgate.gate import Gate
from opsgate.models import ActionState, Identity
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.preconditions import PreconditionRegistry, prometheus_checks
from opsgate.shared import utcnow
from opsgate.store import open_store
from opsgate.store.base import Store
from opsgate.trust import reset, track_record
from opsgate.verification.prometheus import PrometheusProvider
from tests.integration.fault_service import FaultService
from tests.integration.prom import PrometheusServer
from tests.integration.test_execution import action_type, audit_ok, set_fault, wait_for_rate

ROOT = Path(__file__).resolve().parents[2]
AGENT = Identity(id="sre-agent", kind="agent")
BOB = Identity(id="bob", kind="human")
CAROL = Identity(id="carol", kind="human")  # sre-lead: may reset trust
ALICE = Identity(id="alice", kind="human")
S = ActionState
N = 2  # data.trust_ladder.min_verified_passes in this test's copy of the bundle


class Ladder:
    def __init__(
        self, tmp: Path, url: str, prometheus: PrometheusServer, faults: FaultService
    ) -> None:
        self.faults = faults
        policies = tmp / "policies"
        shutil.copytree(ROOT / "policies", policies)
        data = json.loads((policies / "data.json").read_text())
        data["trust_ladder"]["min_verified_passes"] = N
        (policies / "data.json").write_text(json.dumps(data))
        catalog = tmp / "catalog"
        catalog.mkdir()
        # One type whose run sets the service's error ratio: 0 is a healthy change, 0.6
        # a harmful one that the stop condition catches and opsgate rolls back.
        document = action_type(
            "restart_service",
            run=set_fault("{ratio}"),
            undo=set_fault("0"),
            hold="2s",
            extra_params={"ratio": {"type": "string", "pattern": r"^0(\.[0-9])?$"}},
        )
        (catalog / "restart_service.yaml").write_text(json.dumps(document))
        other = action_type("toggle_feature_flag", run=set_fault("0"), undo=set_fault("0"))
        (catalog / "toggle_feature_flag.yaml").write_text(json.dumps(other))
        self.store: Store = open_store(url)
        self.store.migrate()
        self.provider = PrometheusProvider(prometheus.url, timeout=2.0)
        self.gate = Gate(
            store=self.store,
            catalog=load_catalog(catalog),
            engine=EmbeddedEngine(policies),
            preconditions=PreconditionRegistry(prometheus_checks(self.provider)),
        )
        self.executor = Executor(self.store, self.gate, self.provider, worker_id="ladder-worker")

    def propose(self, target: str, ratio: str = "0", action: str = "restart_service") -> Any:
        return self.gate.propose(
            {
                "action": action,
                "target": target,
                "environment": "staging",
                "params": {"fault_url": self.faults.url, "ratio": ratio}
                if action == "restart_service"
                else {"fault_url": self.faults.url},
                "reason": "integration test of the trust ladder",
            },
            AGENT,
        )

    def approve_all(self, outcome: Any) -> str:
        assert outcome.action.state is S.PENDING_APPROVAL, outcome.decision.deny
        for approver in (BOB, CAROL, ALICE)[: outcome.action.required_approvals]:
            self.gate.approve(outcome.action.id, approver)
        return str(outcome.action.id)

    def run(self, action_id: str) -> ActionState:
        claimed = self.executor.claim(action_id)
        assert claimed is not None
        if claimed.state is S.EXECUTING:
            self.executor.launch(action_id)
            assert self.executor.wait_idle(timeout=90), "the action did not finish in 90 s"
        action = self.store.get_action(action_id)
        assert action is not None
        return action.state

    def close(self) -> None:
        self.executor.close()
        self.provider.close()
        self.store.close()


@pytest.fixture
def ladder(
    tmp_path: Path,
    pg_database: Callable[[], str],
    prometheus: PrometheusServer,
    fault_service: FaultService,
) -> Iterator[Ladder]:
    rig = Ladder(tmp_path, pg_database(), prometheus, fault_service)
    yield rig
    rig.close()


def rung(outcome: Any) -> str:
    return str(outcome.decision.result["ladder"]["rung"])


def test_an_agent_climbs_the_ladder_by_verified_passes_and_a_rollback_takes_it_down(
    ladder: Ladder, prometheus: PrometheusServer
) -> None:
    target = f"svc-ladder-{id(ladder)}"
    ladder.faults.add_service(target, error_ratio=0.0)
    wait_for_rate(prometheus, target)

    # Up: on probation it needs one approval more than a human (1 in staging) ...
    for passes in range(N):
        proposed = ladder.propose(target)
        assert rung(proposed) == "probation"
        assert proposed.action.required_approvals == 2
        record = proposed.decision.input["proposer"]["track_record"]["action_type"]
        assert record["verified_passes"] == passes
        assert ladder.run(ladder.approve_all(proposed)) is S.SUCCEEDED

    # ... and N verified passes later, as many as a human.
    proposed = ladder.propose(target)
    assert rung(proposed) == "standard"
    assert proposed.action.required_approvals == 1
    record = proposed.decision.input["proposer"]["track_record"]["action_type_in_environment"]
    assert record["verified_passes"] == N and record["finished"] == N
    assert record["pass_rate"] == 1.0
    assert ladder.run(ladder.approve_all(proposed)) is S.SUCCEEDED

    # Approved before the harmful run, run after it (on another service, so the two do
    # not hold one target): the execution re-check blocks it.
    ladder.faults.add_service(f"{target}-b", error_ratio=0.0)
    waiting = ladder.approve_all(ladder.propose(f"{target}-b"))

    # Down: a harmful change, stopped and rolled back for real ...
    harmful = ladder.propose(target, ratio="0.6")
    assert ladder.run(ladder.approve_all(harmful)) is S.ROLLED_BACK
    execution = ladder.store.get_execution(harmful.action.id)
    assert execution is not None and execution.outcome == "stopped"

    # ... closes that type to the agent, at proposal and at execution ...
    blocked = ladder.propose(target)
    assert blocked.action.state is S.BLOCKED
    assert blocked.decision.deny_codes == ["trust_revoked"]
    assert rung(blocked) == "revoked"
    last = blocked.decision.input["proposer"]["track_record"]["action_type"]["last_run"]
    assert last["rolled_back"] is True
    assert ladder.run(waiting) is S.BLOCKED_AT_EXECUTION
    [recheck] = [d for d in ladder.store.decisions_for(waiting) if d.phase == "execute"]
    assert "trust_revoked" in recheck.deny_codes
    # ... but not other types.
    other = ladder.propose(f"{target}-flag", action="toggle_feature_flag")
    assert other.action.state is S.PENDING_APPROVAL

    # Only a human with a reset role lifts it; the agent is back where its record puts it.
    with pytest.raises(Refused):
        reset(ladder.gate, AGENT.id, "restart_service", "looks fine to me", ALICE)
    reset(ladder.gate, AGENT.id, "restart_service", "postmortem: bad ratio, fixed", CAROL)
    again = ladder.propose(target)
    assert again.action.state is S.PENDING_APPROVAL
    assert rung(again) == "standard" and again.action.required_approvals == 1
    assert [e.kind for e in ladder.store.audit_events() if e.kind == "trust.reset"] == [
        "trust.reset"
    ]
    audit_ok(ladder.store)

    # What every decision above read (the summary the worker and the gate kept as they
    # wrote) is what the reports' queries count from these real runs.
    now = utcnow() + timedelta(seconds=1)
    for action, environment in (("restart_service", "staging"), ("toggle_feature_flag", "staging")):
        kept = track_record(ladder.store, AGENT.id, action, environment, now)
        counted = track_record(ladder.store, AGENT.id, action, environment, now, as_of=True)
        assert kept.scopes == counted.scopes
    assert kept.scopes["overall"].verified_passes >= N
    assert kept.scopes["overall"].automatic_rollbacks == 1
