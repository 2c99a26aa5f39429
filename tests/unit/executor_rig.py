"""The executor rig the unit tests share: a worker engine on the in-memory store, a
static signal provider and a fake runner, over two action types."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from opsgate.audit import verify_chain
from opsgate.catalog import load_catalog
from opsgate.executor.executor import Executor
from opsgate.executor.runners import RunnerRegistry, StepResult
from opsgate.gate import Gate
from opsgate.models import ActionState, Identity, Step
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.testing import MemoryStore
from opsgate.testing_signals import StaticSignalProvider

ROOT = Path(__file__).resolve().parents[2]
ALICE = Identity(id="alice", kind="human")
BOB = Identity(id="bob", kind="human")
CAROL = Identity(id="carol", kind="human")
AGENT = Identity(id="sre-agent", kind="agent")
ERR = 'err{service="checkout"}'

VERIFICATION = """
verification:
  interval: 0.05s
  hold: 0.15s
  timeout: 1s
  signals:
    - {name: error_rate, query: 'err{service="{target}"}', pass: {max: 0.01}}
  stop_conditions:
    - {name: error_spike, query: 'err{service="{target}"}', halt: {min: 0.2}}
  failure_limit: 1
  error_limit: 2
"""

SCALE = (
    """
name: scale_deployment
risk: medium
params:
  deployment: {type: string, pattern: "^[a-z0-9-]{1,63}$"}
  replicas: {type: integer, minimum: 0, maximum: 1000}
capture: {runner: fake, argv: [get, "{deployment}"], as: previous_replicas}
run: {runner: fake, argv: [scale, "{deployment}", "{replicas}"], timeout: 5s}
undo: {runner: fake, argv: [scale, "{deployment}", "{previous_replicas}"], timeout: 5s}
"""
    + VERIFICATION
)

DRAIN = (
    """
name: drain_node
risk: high
params:
  node: {type: string, pattern: "^[a-z0-9-]{1,63}$"}
run: {runner: fake, argv: [drain, "{node}"], timeout: 5s}
"""
    + VERIFICATION
)


class FakeRunner:
    """Answers steps by their first argv element; records every call."""

    name = "fake"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.results: dict[str, StepResult] = {}
        self.effects: dict[str, Callable[[], None]] = {}
        self.block_run = False
        self.run_started = threading.Event()

    def run(
        self,
        step: Step,
        values: Mapping[str, Any],
        *,
        secrets: Collection[str] = (),
        cancel: threading.Event | None = None,
    ) -> StepResult:
        assert step.argv is not None
        argv = [part.format(**values) for part in step.argv]
        self.calls.append(argv)
        verb = argv[0]
        if verb in self.effects:
            self.effects[verb]()
        if verb in {"scale", "drain"} and self.block_run and len(self.calls) <= 2:
            self.run_started.set()
            assert cancel is not None
            if cancel.wait(5):
                return StepResult(False, -9, "", error="cancelled")
        return self.results.get(verb, StepResult(True, 0, "ok", value="3"))

    def verbs(self) -> list[str]:
        return [call[0] for call in self.calls]


class Rig:
    def __init__(self, tmp: Path) -> None:
        catalog_dir = tmp / "catalog"
        catalog_dir.mkdir()
        (catalog_dir / "scale_deployment.yaml").write_text(SCALE)
        (catalog_dir / "drain_node.yaml").write_text(DRAIN)
        self.catalog_dir = catalog_dir
        self.store = MemoryStore()
        self.freeze: list[dict[str, Any]] = []
        self.gate = Gate(
            store=self.store,
            catalog=load_catalog(catalog_dir),
            engine=EmbeddedEngine(ROOT / "policies"),
            freeze_windows=lambda: self.freeze,
        )
        self.provider = StaticSignalProvider({ERR: 0.001})
        self.runner = FakeRunner()
        self.executor = Executor(
            self.store,
            self.gate,
            self.provider,
            RunnerRegistry({"fake": self.runner}),
            catalog=lambda: self.gate.catalog,
            worker_id="test-worker",
            lease=30,
        )

    def approved(self, document: dict[str, Any] | None = None, *approvers: Identity) -> str:
        outcome = self.gate.propose(document or scale(), ALICE)
        assert outcome.action.state is ActionState.PENDING_APPROVAL, outcome.decision.deny
        for approver in approvers or (BOB,):
            self.gate.approve(outcome.action.id, approver)
        return outcome.action.id

    def run(self, action_id: str) -> ActionState:
        claimed = self.executor.claim(action_id)
        assert claimed is not None
        if claimed.state is ActionState.EXECUTING:
            self.executor.launch(action_id)
            assert self.executor.wait_idle(timeout=10)
        action = self.store.get_action(action_id)
        assert action is not None
        return action.state


def scale(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "action": "scale_deployment",
        "target": "checkout",
        "environment": "prod",
        "params": {"deployment": "checkout", "replicas": 6},
        "reason": "p99 latency over SLO",
    }
    document.update(overrides)
    return document


def audit_ok(store: MemoryStore) -> None:
    report = verify_chain(list(store.audit_events()), head=store.audit_head())
    assert report.ok, report
