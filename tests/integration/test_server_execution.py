"""`run` and a manual `rollback` through `opsgate server`: authorized by the bundle, then
carried out by the server's executor against a real Prometheus; the client follows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.integration.api_server import ApiServer, run_cli
from tests.integration.execution_rig import action_type, set_fault, wait_for_rate
from tests.integration.fault_service import FaultService
from tests.integration.prom import PrometheusServer
from tests.integration.test_server import Rig

pytestmark = pytest.mark.integration


def test_run_and_rollback_through_the_server(
    tmp_path: Path, prometheus: PrometheusServer, fault_service: FaultService
) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    document = action_type("restart_service", run=set_fault("0"), undo=set_fault("0"), hold="1s")
    (catalog / "restart_service.yaml").write_text(json.dumps(document))
    rig = Rig(tmp_path)
    rig.env["OPSGATE_CATALOG"] = str(catalog)
    rig.tokens = {who: rig.token(who, "--kind", "human") for who in ("alice", "bob", "dave")} | {
        "agent": rig.token("sre-agent", "--kind", "agent")
    }
    # The runner steps import tests.integration: the server runs them from the repo root.
    rig.server = ApiServer(
        {**rig.env, "OPSGATE_PROMETHEUS_URL": prometheus.url, "PYTHONPATH": os.getcwd()}
    )
    target = f"api-run-{os.getpid()}"
    fault_service.add_service(target)
    wait_for_rate(prometheus, target)
    rig.server.start()
    try:
        proposal = {
            "action": "restart_service", "target": target, "environment": "staging",
            "params": {"fault_url": fault_service.url}, "reason": "through the API",
        }  # fmt: skip
        action_id = rig.call("POST", "/actions", rig.tokens["alice"], proposal)[1]["action"]["id"]
        status, body = rig.call("POST", f"/actions/{action_id}/approve", rig.tokens["bob"], {})
        assert status == 200 and body["action"]["state"] == "approved", body

        before = rig.rows()
        for who in ("dave", "agent"):  # no run role / never an agent
            status, body = rig.call("POST", f"/actions/{action_id}/run", rig.tokens[who], {})
            assert status == 403 and body["error"]["codes"] == ["insufficient_permissions"]
        after = rig.rows()
        assert after["executions"] == before["executions"] == 0
        assert after["decisions"] == before["decisions"] + 2  # the refusals, recorded

        def client(who: str, *args: str) -> tuple[int, str, str]:
            env = {"OPSGATE_URL": rig.server.url, "OPSGATE_TOKEN": rig.tokens[who]}
            done = run_cli(env, *args, cwd=tmp_path)
            return done.returncode, done.stdout, done.stderr

        code, out, err = client("bob", "run", action_id)
        assert code == 0, out + err
        assert f"action {action_id} succeeded" in out

        code, _, err = client("dave", "rollback", action_id, "--reason", "mine")
        assert code == 3 and "rollback refused" in err
        code, out, err = client("bob", "rollback", action_id, "--reason", "customers report errors")
        assert code == 0, out + err
        assert f"action {action_id} rolled_back" in out
        _, details = rig.call("GET", f"/actions/{action_id}", rig.tokens["alice"])
        assert details["execution"]["rollback_requested_by"] == "bob"
        # The server's executor held it, as a worker principal of its own in the trail.
        worker_id = details["execution"]["worker_id"]
        assert worker_id.startswith("server:")
        claimed = [e for e in details["events"] if e["kind"] == "action.executing"]
        assert claimed and claimed[0]["actor"] == worker_id, details["events"]
        (registered,) = [e for e in rig.store.audit_events() if e.kind == "worker.registered"]
        assert registered.actor == worker_id and registered.data["principal_kind"] == "worker"

        code, _, err = client("bob", "run", action_id)
        assert code == 5 and "only approved actions" in err
    finally:
        rig.server.stop()
        rig.store.close()
