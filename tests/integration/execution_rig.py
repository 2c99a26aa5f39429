"""The execution rig the integration tests share: action types that switch the fault
service, a worker engine on a real store, real Prometheus and the default Rego bundle, and
the `opsgate` command as a user types it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import Any

from opsgate.audit import verify_chain
from opsgate.catalog import load_catalog
from opsgate.executor.executor import Executor
from opsgate.gate import Gate
from opsgate.models import ActionState, Identity
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.preconditions import PreconditionRegistry, prometheus_checks
from opsgate.store import open_store
from opsgate.verification.prometheus import PrometheusProvider
from tests.integration.fault_service import FaultService
from tests.integration.prom import PrometheusServer

ROOT = Path(__file__).resolve().parents[2]
ALICE = Identity(id="alice", kind="human")
BOB = Identity(id="bob", kind="human")
CAROL = Identity(id="carol", kind="human")
_names = count()

# Short windows so a test sees a change within seconds of a 1 s scrape.
ERROR_RATIO = (
    'sum(rate(http_requests_total{service="{target}",code=~"5.."}[4s]))'
    ' / sum(rate(http_requests_total{service="{target}"}[4s]))'
)


def set_fault(ratio: str) -> list[str]:
    """An argv that switches the fault service from another process, as a runner would."""
    return [
        sys.executable, "-m", "tests.integration.fault_service", "set",
        "--url", "{fault_url}", "--service", "{target}", "--ratio", ratio,
    ]  # fmt: skip


def action_type(
    name: str,
    *,
    run: list[str],
    undo: list[str] | None,
    hold: str = "3s",
    timeout: str = "20s",
    failure_limit: int = 2,
    error_limit: int = 2,
    halt_min: float = 0.3,
    signal_query: str = ERROR_RATIO,
    run_timeout: str = "20s",
    preconditions: tuple[str, ...] = (),
    extra_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "name": name,
        "risk": "medium",
        "params": {
            "fault_url": {"type": "string", "pattern": r"^http://127\.0\.0\.1:[0-9]+$"},
            **(extra_params or {}),
        },
        "run": {"argv": run, "timeout": run_timeout},
        "preconditions": list(preconditions),
        "verification": {
            "interval": "1s",
            "hold": hold,
            "timeout": timeout,
            "signals": [{"name": "error_rate", "query": signal_query, "pass": {"max": 0.05}}],
            "stop_conditions": [
                {"name": "error_spike", "query": ERROR_RATIO, "halt": {"min": halt_min}}
            ],
            "failure_limit": failure_limit,
            "error_limit": error_limit,
        },
    }
    if undo is not None:
        document["undo"] = {"argv": undo, "timeout": "20s"}
    return document


class Rig:
    """A worker engine on a real store, real Prometheus and the default Rego bundle."""

    def __init__(self, tmp: Path, url: str, prometheus: PrometheusServer, faults: FaultService):
        self.tmp = tmp
        self.faults = faults
        self.catalog_dir = tmp / "catalog"
        self.catalog_dir.mkdir(exist_ok=True)
        self.store = open_store(url)
        self.store.migrate()
        self.provider = PrometheusProvider(prometheus.url, timeout=2.0)
        self.gate: Gate | None = None
        self.executor: Executor | None = None

    def define(self, *types: dict[str, Any]) -> None:
        for document in types:
            path = self.catalog_dir / f"{document['name']}.yaml"
            path.write_text(json.dumps(document))
        self.gate = Gate(
            store=self.store,
            catalog=load_catalog(self.catalog_dir),
            engine=EmbeddedEngine(ROOT / "policies"),
            preconditions=PreconditionRegistry(prometheus_checks(self.provider)),
        )
        self.executor = Executor(
            self.store,
            self.gate,
            self.provider,
            catalog=lambda: self.gate.catalog,
            worker_id="it-worker",
        )

    def service(self, ratio: float = 0.0) -> str:
        """A fresh service (no earlier faults in its rate window)."""
        name = f"svc-{os.getpid()}-{next(_names)}"
        self.faults.add_service(name, error_ratio=ratio)
        return name

    def propose(self, action: str, target: str, **params: Any) -> Any:
        assert self.gate is not None
        return self.gate.propose(
            {
                "action": action,
                "target": target,
                "environment": "staging",
                "params": {"fault_url": self.faults.url, **params},
                "reason": "integration test",
            },
            ALICE,
        )

    def approved(self, action: str, target: str, **params: Any) -> str:
        outcome = self.propose(action, target, **params)
        assert outcome.action.state is ActionState.PENDING_APPROVAL, outcome.decision.deny
        assert self.gate is not None
        self.gate.approve(outcome.action.id, BOB)
        if outcome.action.required_approvals > 1:
            self.gate.approve(outcome.action.id, CAROL)
        return str(outcome.action.id)

    def run(self, action_id: str, *, during: Callable[[], None] | None = None) -> ActionState:
        assert self.executor is not None
        claimed = self.executor.claim(action_id)
        assert claimed is not None
        if claimed.state is ActionState.EXECUTING:
            self.executor.launch(action_id)
            if during is not None:
                during()
            assert self.executor.wait_idle(timeout=90), "the action did not finish in 90 s"
        action = self.store.get_action(action_id)
        assert action is not None
        return action.state

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
        self.provider.close()
        self.store.close()


def wait_for_rate(prometheus: PrometheusServer, service: str, timeout: float = 15.0) -> None:
    """Until Prometheus has enough samples of a new service for a [4s] rate."""
    query = ERROR_RATIO.replace("{target}", service)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if prometheus.api_query(query)["data"]["result"]:
            return
        time.sleep(0.25)
    raise AssertionError(f"no rate for {service} after {timeout}s")


def audit_ok(store: Any) -> None:
    report = verify_chain(list(store.audit_events()), head=store.audit_head())
    assert report.ok, report


def opsgate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "opsgate", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def clean_env() -> dict[str, str]:
    """This process's environment without any OPSGATE_* setting that would leak in."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")}


def policies_granting(tmp: Path, operator: str, role: str = "sre") -> Path:
    """A copy of the shipped bundle in which `operator` holds `role`."""
    policies = tmp / "policies"
    shutil.copytree(ROOT / "policies", policies)
    data = json.loads((policies / "data.json").read_text())
    data["roles"][operator] = [role]
    (policies / "data.json").write_text(json.dumps(data))
    return policies
