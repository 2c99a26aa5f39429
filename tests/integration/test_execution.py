"""Run, verify, stop and roll back against a real Prometheus scraping the fault service,
with the real shell runner, the real regopy engine and a real SQL store."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from opsgate.catalog import load_catalog
from opsgate.gate import Gate
from opsgate.models import ActionState, Identity
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.store import open_store
from opsgate.store.sql import SqlStore
from tests.integration.execution_rig import (
    ERROR_RATIO,
    ROOT,
    Rig,
    action_type,
    audit_ok,
    clean_env,
    opsgate,
    policies_granting,
    set_fault,
    wait_for_rate,
)
from tests.integration.fault_service import FaultService
from tests.integration.prom import PrometheusServer

S = ActionState


def test_a_fix_passes_verification(rig: Rig, prometheus: PrometheusServer) -> None:
    rig.define(
        action_type(
            "restart_service",
            run=set_fault("0"),
            undo=set_fault("0.5"),
            halt_min=0.9,  # a fix starts from a high error rate: halt only if it gets worse
            # No failure is tolerated: measurements whose window still holds the fault's
            # samples are stored as pre-change and do not count.
            failure_limit=0,
            preconditions=("error_rate_elevated",),
        )
    )
    target = rig.service(ratio=0.5)
    wait_for_rate(prometheus, target)
    action_id = rig.approved("restart_service", target)
    assert rig.run(action_id) is S.SUCCEEDED
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.outcome == "succeeded"
    assert rig.faults.state()[target]["error_ratio"] == 0.0
    signals = [
        m
        for m in rig.store.measurements_for(action_id)
        if m.kind == "signal" and m.phase == "verify"
    ]
    assert signals[-1].outcome == "pass" and signals[-1].value is not None
    assert signals[-1].value <= 0.05
    assert signals[-1].not_counted is None
    # the first measurements still read the fault through the [4s] window: kept, not counted
    assert signals[0].not_counted == "pre_change"
    assert all(m.outcome == "pass" for m in signals if m.not_counted is None)
    # the error rate was elevated before: the live precondition saw it, twice
    decisions = rig.store.decisions_for(action_id)
    for decision in decisions:
        checks = {p["name"]: p for p in decision.input.get("preconditions", [])}
        if decision.phase in ("propose", "execute"):
            assert checks["error_rate_elevated"]["ok"] is True
            assert checks["error_rate_elevated"]["value"] > 0.05
    audit_ok(rig.store)


def test_the_fix_is_blocked_at_execution_when_the_error_rate_is_no_longer_elevated(
    rig: Rig, prometheus: PrometheusServer
) -> None:
    rig.define(
        action_type(
            "restart_service",
            run=set_fault("0"),
            undo=set_fault("0"),
            preconditions=("error_rate_elevated",),
        )
    )
    target = rig.service(ratio=0.5)
    wait_for_rate(prometheus, target)
    action_id = rig.approved("restart_service", target)
    rig.faults.set_error_ratio(target, 0.0)  # it healed by itself after approval
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        value = prometheus.api_query(ERROR_RATIO.replace("{target}", target))["data"]["result"]
        if value and float(value[0]["value"][1]) <= 0.05:
            break
        time.sleep(0.5)
    assert rig.run(action_id) is S.BLOCKED_AT_EXECUTION
    execute = [d for d in rig.store.decisions_for(action_id) if d.phase == "execute"]
    assert execute[-1].deny_codes == ["missing_precondition"]
    assert rig.store.get_execution(action_id) is None


def test_a_change_that_makes_things_worse_is_stopped_and_rolled_back(
    rig: Rig, prometheus: PrometheusServer
) -> None:
    rig.define(
        action_type("toggle_feature_flag", run=set_fault("0.6"), undo=set_fault("0"), hold="2s")
    )
    target = rig.service()
    wait_for_rate(prometheus, target)
    action_id = rig.approved("toggle_feature_flag", target)
    assert rig.run(action_id) is S.ROLLED_BACK
    execution = rig.store.get_execution(action_id)
    assert execution is not None
    assert execution.outcome == "stopped"
    assert execution.trigger_name == "error_spike" and execution.trigger_kind == "stop_condition"
    assert execution.trigger_value is not None and execution.trigger_value >= 0.3
    assert execution.undo_exit_code == 0
    assert execution.rollback_time is not None and 0 < execution.rollback_time < 60
    assert rig.faults.state()[target]["error_ratio"] == 0.0
    measurements = rig.store.measurements_for(action_id)
    halted = [m for m in measurements if m.kind == "stop_condition" and m.outcome == "fail"]
    assert halted and halted[0].value == pytest.approx(execution.trigger_value)
    rollback = [m for m in measurements if m.phase == "rollback" and m.kind == "signal"]
    assert rollback[-1].outcome == "pass"
    audit_ok(rig.store)


def test_verification_that_never_reaches_hold_times_out_and_rolls_back(
    rig: Rig, prometheus: PrometheusServer
) -> None:
    rig.define(
        action_type(
            "scale_deployment",
            run=set_fault("0.1"),  # worse, but under the halt range: fails, never halts
            undo=set_fault("0"),
            hold="2s",
            # [4s] window + 1 s scrape: counting starts 5 s after run; the undo needs as long
            timeout="10s",
            failure_limit=100,
        )
    )
    target = rig.service()
    wait_for_rate(prometheus, target)
    action_id = rig.approved("scale_deployment", target)
    assert rig.run(action_id) is S.ROLLED_BACK
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.outcome == "timeout"
    assert "not reached within timeout" in execution.reason
    assert_no_pre_change_evidence_counted(rig, action_id, harmful_ratio=0.1)


def assert_no_pre_change_evidence_counted(rig: Rig, action_id: str, harmful_ratio: float) -> None:
    """Every counted verify measurement saw the change's own error ratio (nothing of the
    healthy samples before it); the pre-change ones were stored but not counted."""
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.run_finished_at is not None
    verify = [
        m
        for m in rig.store.measurements_for(action_id)
        if m.phase == "verify" and m.kind == "signal"
    ]
    counted = [m for m in verify if m.not_counted is None]
    assert counted, "no measurement counted"
    for m in counted:
        assert m.outcome == "fail" and m.value == pytest.approx(harmful_ratio, abs=0.02), m
        assert (m.at - execution.run_finished_at).total_seconds() >= 5.0
    assert all(m.not_counted == "pre_change" for m in verify if m not in counted)
    assert not any(m.outcome == "pass" for m in counted)


def test_a_harmful_change_is_rolled_back_even_while_its_window_still_looks_healthy(
    rig: Rig, prometheus: PrometheusServer
) -> None:
    """The flake this rule removes: with hold shorter than the query window, the first
    intervals after `run` read mostly healthy samples and used to pass the whole hold.
    Now they are pre-change, and the first counted measurement fails (failure_limit 0)."""
    rig.define(
        action_type(
            "scale_deployment",
            run=set_fault("0.1"),  # worse, under the halt range: only the signal can tell
            undo=set_fault("0"),
            hold="1s",
            timeout="15s",
            failure_limit=0,
        )
    )
    target = rig.service()
    wait_for_rate(prometheus, target)
    action_id = rig.approved("scale_deployment", target)
    assert rig.run(action_id) is S.ROLLED_BACK
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.outcome == "failed_verification"
    assert_no_pre_change_evidence_counted(rig, action_id, harmful_ratio=0.1)
    assert rig.faults.state()[target]["error_ratio"] == 0.0


def test_prometheus_down_mid_verification_counts_errors_and_rolls_back(
    tmp_path: Path,
    sqlite_url: str,
    prometheus_factory: Callable[..., PrometheusServer],
    fault_service: FaultService,
) -> None:
    own = prometheus_factory()
    rig = Rig(tmp_path, sqlite_url, own, fault_service)
    try:
        rig.define(
            action_type(
                "scale_deployment",
                run=set_fault("0"),
                undo=set_fault("0"),
                hold="30s",
                timeout="60s",
                error_limit=2,
            )
        )
        target = rig.service()
        wait_for_rate(own, target)
        action_id = rig.approved("scale_deployment", target)

        def stop_prometheus_once_verifying() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                measured = rig.store.measurements_for(action_id)
                if any(m.phase == "verify" and m.outcome == "pass" for m in measured):
                    own.stop()
                    return
                time.sleep(0.2)

        assert rig.run(action_id, during=stop_prometheus_once_verifying) is S.ROLLBACK_FAILED
        execution = rig.store.get_execution(action_id)
        assert execution is not None
        assert execution.outcome == "provider_errors"
        assert execution.undo_exit_code == 0  # the undo ran; only its verification failed
        assert execution.rollback_verified_at is None
        errors = [m for m in rig.store.measurements_for(action_id) if m.outcome == "error"]
        assert len(errors) >= 3
        audit_ok(rig.store)
    finally:
        rig.close()


def test_a_runner_that_times_out_is_rolled_back(rig: Rig, prometheus: PrometheusServer) -> None:
    rig.define(
        action_type(
            "restart_service",
            run=[sys.executable, "-c", "import time; time.sleep(60)"],
            undo=set_fault("0"),
            run_timeout="1s",
            hold="2s",
        )
    )
    target = rig.service()
    wait_for_rate(prometheus, target)
    action_id = rig.approved("restart_service", target)
    started = time.monotonic()
    assert rig.run(action_id) is S.ROLLED_BACK
    execution = rig.store.get_execution(action_id)
    assert execution is not None
    assert execution.outcome == "runner_error"
    assert execution.run_error == "timed out after 1s"
    assert time.monotonic() - started < 40


def test_an_irreversible_action_that_fails_verification_fails_loudly(
    rig: Rig, prometheus: PrometheusServer
) -> None:
    rig.define(
        action_type("drain_node", run=set_fault("0.1"), undo=None, failure_limit=0, hold="2s")
    )
    target = rig.service()
    wait_for_rate(prometheus, target)
    action_id = rig.approved("drain_node", target)
    assert rig.run(action_id) is S.FAILED
    execution = rig.store.get_execution(action_id)
    assert execution is not None
    assert execution.outcome == "failed_verification"
    assert execution.reason.startswith("IRREVERSIBLE")
    assert execution.undo_started_at is None
    rig.faults.set_error_ratio(target, 0.0)


def test_crafted_params_stay_literal_in_promql_and_argv(
    rig: Rig, prometheus: PrometheusServer, tmp_path: Path
) -> None:
    out = tmp_path / "argv.json"
    record = [
        sys.executable, "-c",
        "import json, sys; open(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))",
        str(out), "{label}",
    ]  # fmt: skip
    query = (
        'sum(rate(http_requests_total{service="{target}",route="{label}",code=~"5.."}[4s]))'
        ' / sum(rate(http_requests_total{service="{target}",route="{label}"}[4s]))'
    )
    rig.define(
        action_type(
            "restart_service",
            run=record,
            undo=[sys.executable, "-c", "pass"],
            signal_query=query,
            timeout="4s",
            hold="2s",
            extra_params={"label": {"type": "string", "maxLength": 200}},
        )
    )
    target = rig.service()
    wait_for_rate(prometheus, target)
    crafted = '"} or vector(0) or x{a="; echo $(id) `id` && rm -rf /tmp/nothing'
    action_id = rig.approved("restart_service", target, label=crafted)
    state = rig.run(action_id)
    # The argv element arrived as one literal string: no shell ever saw it.
    assert json.loads(out.read_text()) == [crafted]
    # In PromQL it stayed a label value: no series has it, so no data, never a pass
    # (had it escaped the string, `vector(0)` would have passed the signal).
    signals = [m for m in rig.store.measurements_for(action_id) if m.kind == "signal"]
    assert signals and {m.outcome for m in signals} == {"inconclusive"}
    assert state in (S.ROLLED_BACK, S.ROLLBACK_FAILED)


def test_a_signal_without_data_never_succeeds(rig: Rig, prometheus: PrometheusServer) -> None:
    silent = 'sum(rate(http_requests_total{service="{target}-does-not-exist"}[4s]))'
    rig.define(
        action_type(
            "restart_service",
            run=set_fault("0"),
            undo=set_fault("0"),
            signal_query=silent,
            hold="1s",
            timeout="4s",
        )
    )
    target = rig.service()
    wait_for_rate(prometheus, target)
    action_id = rig.approved("restart_service", target)
    assert rig.run(action_id) is S.ROLLBACK_FAILED  # rollback verification is silent too
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.outcome == "timeout"
    outcomes = {m.outcome for m in rig.store.measurements_for(action_id) if m.kind == "signal"}
    assert outcomes == {"inconclusive"}


def test_cli_run_worker_show_and_rollback(
    tmp_path: Path, pg_url: str, prometheus: PrometheusServer, fault_service: FaultService
) -> None:
    """The commands a user types, on PostgreSQL: run, worker --once, show, rollback."""
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    for document in (
        action_type("toggle_feature_flag", run=set_fault("0.6"), undo=set_fault("0"), hold="2s"),
        action_type("restart_service", run=set_fault("0"), undo=set_fault("0"), hold="2s"),
    ):
        (catalog / f"{document['name']}.yaml").write_text(json.dumps(document))
    # On a shared store who acts is never self-asserted (OPSGATE_IDENTITY=env is refused):
    # the operator running `opsgate run` here is PostgreSQL's session_user, given the sre
    # role in a copy of the bundle. People propose and approve through `opsgate server`;
    # here the gate is driven in-process instead.
    operator = make_url(pg_url).username or "postgres"
    policies = policies_granting(tmp_path, operator)
    env = {
        **clean_env(),
        "OPSGATE_DB": pg_url,
        "OPSGATE_CATALOG": str(catalog),
        "OPSGATE_POLICIES": str(policies),
        "OPSGATE_PROMETHEUS_URL": prometheus.url,
        "OPSGATE_IDENTITY": "postgres",
    }
    bob = env
    assert opsgate(env, "init").returncode == 0
    refused = opsgate({**env, "OPSGATE_IDENTITY": "env", "OPSGATE_USER": "bob"}, "whoami")
    assert refused.returncode == 2 and "OPSGATE_IDENTITY=env is refused" in refused.stderr
    store = open_store(pg_url)
    assert isinstance(store, SqlStore)
    gate = Gate(store=store, catalog=load_catalog(catalog), engine=EmbeddedEngine(policies))
    good, bad = f"cli-good-{os.getpid()}", f"cli-bad-{os.getpid()}"
    for name in (good, bad):
        fault_service.add_service(name)
        wait_for_rate(prometheus, name)

    def propose_and_approve(action: str, target: str) -> str:
        document = {
            "action": action, "target": target, "environment": "staging",
            "params": {"fault_url": fault_service.url}, "reason": "cli test",
        }  # fmt: skip
        proposed = gate.propose(document, Identity(id="alice", kind="human")).action
        assert proposed.state is ActionState.PENDING_APPROVAL
        approved = gate.approve(proposed.id, Identity(id="bob", kind="human")).action
        assert approved.state is ActionState.APPROVED
        return proposed.id

    good_id = propose_and_approve("restart_service", good)
    ran = opsgate(bob, "run", good_id)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert f"action {good_id} succeeded" in ran.stdout
    assert "verify error_rate=" in ran.stdout  # plain lines when not a terminal

    bad_id = propose_and_approve("toggle_feature_flag", bad)
    worked = opsgate(bob, "worker", "--once")
    assert worked.returncode == 0, worked.stderr
    assert "stop_condition" not in worked.stderr

    shown = opsgate(bob, "show", bad_id, "--json")
    assert shown.returncode == 0, shown.stderr
    details = json.loads(shown.stdout)
    assert details["action"]["state"] == "rolled_back"
    assert details["execution"]["outcome"] == "stopped"
    assert details["execution"]["trigger_name"] == "error_spike"
    assert details["execution"]["rollback_time"] > 0
    assert any(m["outcome"] == "fail" for m in details["measurements"])
    table = opsgate(bob, "show", bad_id)
    assert "rollback time" in table.stdout and "error_spike" in table.stdout

    # a manual rollback of the good one, itself verified
    rolled = opsgate(bob, "rollback", good_id, "--reason", "customers report errors")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert f"action {good_id} rolled_back" in rolled.stdout
    again = opsgate(bob, "run", good_id)
    assert again.returncode == 5 and "only approved actions" in again.stderr
    verified = opsgate(bob, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    store.close()


def test_cli_run_without_prometheus_refuses_to_run(tmp_path: Path, sqlite_url: str) -> None:
    env = {
        **clean_env(),
        "OPSGATE_DB": sqlite_url,
        "OPSGATE_CATALOG": str(ROOT / "catalog"),
        "OPSGATE_POLICIES": str(ROOT / "policies"),
    }
    assert opsgate(env, "init").returncode == 0
    alice, bob = (
        {**env, "OPSGATE_IDENTITY": "env", "OPSGATE_USER": "alice"},
        {
            **env,
            "OPSGATE_IDENTITY": "env",
            "OPSGATE_USER": "bob",
        },
    )
    proposed = opsgate(
        alice, "propose", "restart_service", "--target", "web", "--env", "staging",
        "--param", "deployment=web", "--reason", "no prometheus", "--json",
    )  # fmt: skip
    action_id = json.loads(proposed.stdout)["action"]["id"]
    assert opsgate(bob, "approve", action_id).returncode == 0
    result = opsgate(bob, "run", action_id)
    assert result.returncode == 2
    assert "OPSGATE_PROMETHEUS_URL is not set" in result.stderr
    shown = json.loads(opsgate(bob, "show", action_id, "--json").stdout)
    assert shown["action"]["state"] == "approved" and shown["execution"] is None
    # An unknown id is not found whatever the configuration.
    assert opsgate(bob, "run", "01JDOESNOTEXIST0000000000").returncode == 4
