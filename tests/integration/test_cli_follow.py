"""Following actions as a user does: Ctrl-C during `opsgate run` hands the action over,
`opsgate run ID` resumes it here, `opsgate watch ID` follows it to its exit code; with
real Prometheus, the real shell runner, the regopy engine and SQLite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from opsgate.store.sql import SqlStore
from tests.integration.execution_rig import (
    action_type,
    clean_env,
    opsgate,
    set_fault,
    wait_for_rate,
)
from tests.integration.fault_service import FaultService
from tests.integration.prom import PrometheusServer

ROOT = Path(__file__).resolve().parents[2]


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "opsgate", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def users(
    tmp_path: Path, sqlite_url: str, prometheus: PrometheusServer, fault_service: FaultService
) -> Iterator[tuple[dict[str, str], dict[str, str], SqlStore, str]]:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    # A fix that verifies after holding for 6 s: time enough to interrupt it mid-way.
    document = action_type("restart_service", run=set_fault("0"), undo=set_fault("0"), hold="6s")
    (catalog / "restart_service.yaml").write_text(json.dumps(document))
    env = {
        **clean_env(),
        "OPSGATE_DB": sqlite_url,
        "OPSGATE_CATALOG": str(catalog),
        "OPSGATE_POLICIES": str(ROOT / "policies"),
        "OPSGATE_PROMETHEUS_URL": prometheus.url,
        "OPSGATE_IDENTITY": "env",
        "OPSGATE_LEASE": "30s",
    }
    service = f"follow-{os.getpid()}"
    fault_service.add_service(service)
    wait_for_rate(prometheus, service)
    store = SqlStore(sqlite_url)
    try:
        yield {**env, "OPSGATE_USER": "alice"}, {**env, "OPSGATE_USER": "bob"}, store, service
    finally:
        store.close()


def events(store: SqlStore, action_id: str) -> list[str]:
    return [e.kind for e in store.audit_events(action_id=action_id)]


def state(store: SqlStore, action_id: str) -> str:
    action = store.get_action(action_id)
    assert action is not None
    return action.state.value


def test_ctrl_c_hands_over_and_run_resumes_while_watch_follows(
    users: tuple[dict[str, str], dict[str, str], SqlStore, str], fault_service: FaultService
) -> None:
    alice, bob, store, service = users
    proposed = opsgate(
        alice, "propose", "restart_service", "--target", service, "--env", "staging",
        "--param", f"fault_url={fault_service.url}", "--reason", "follow test", "--json",
    )  # fmt: skip
    assert proposed.returncode == 0, proposed.stderr
    action_id = str(json.loads(proposed.stdout)["action"]["id"])
    short = action_id[:10].lower()
    assert opsgate(bob, "approve", short).returncode == 0

    watcher = start(bob, "watch", short, "--interval", "0.2")
    processes: list[subprocess.Popen[str]] = [watcher]
    try:
        first = start(bob, "run", short)
        processes.append(first)
        wait_until(lambda: state(store, action_id) == "verifying", "verification to start")
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=60)
        assert first.returncode == 130, out + err
        assert f"opsgate run {action_id}" in err and "interrupted" in err
        assert state(store, action_id) == "verifying"
        assert "execution.released" in events(store, action_id)

        second = start(bob, "run", short)
        processes.append(second)
        wait_until(
            lambda: "execution.recovered" in events(store, action_id), "the run to resume it"
        )
        # While this host's run holds it, another `run` is refused and told to watch.
        third = opsgate(bob, "run", short)
        assert third.returncode == 5, third.stderr
        assert "holds it" in third.stderr and f"opsgate watch {action_id}" in third.stderr
        out, err = second.communicate(timeout=90)
        assert second.returncode == 0, out + err
        assert "resuming" in err and f"action {action_id} succeeded" in out

        watched_out, watched_err = watcher.communicate(timeout=30)
        assert watcher.returncode == 0, watched_out + watched_err
        assert "verify error_rate=" in watched_out and "pass" in watched_out
        assert "execution.released" in watched_out and "execution.recovered" in watched_out
        assert f"action {action_id} succeeded" in watched_out
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert state(store, action_id) == "succeeded"
    assert opsgate(bob, "audit", "verify").returncode == 0


def test_watch_exit_codes_and_interrupt(
    users: tuple[dict[str, str], dict[str, str], SqlStore, str], fault_service: FaultService
) -> None:
    alice, bob, store, service = users
    proposed = opsgate(
        alice, "propose", "restart_service", "--target", service, "--env", "staging",
        "--param", f"fault_url={fault_service.url}", "--reason", "watch test", "--json",
    )  # fmt: skip
    action_id = str(json.loads(proposed.stdout)["action"]["id"])
    # Pending: watch waits; Ctrl-C stops watching, never the action.
    watcher = start(bob, "watch", action_id, "--interval", "0.2")
    try:
        assert watcher.stdout is not None
        first_line = watcher.stdout.readline()  # the watch is under way
        time.sleep(1.0)
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=30)
        out = first_line + out
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 130, out + err
    assert "stopped watching" in err and "pending_approval" in err
    assert "action.pending_approval" in out
    assert state(store, action_id) == "pending_approval"
    # A cancelled action ends the watch at once with a failure exit code, as `run` would.
    assert opsgate(alice, "cancel", action_id).returncode == 0
    ended = opsgate(bob, "watch", action_id, "--json")
    assert ended.returncode == 1 and f"action {action_id} cancelled" in ended.stderr
    document: Any = json.loads(ended.stdout)
    assert document["action"]["state"] == "cancelled"
    refused = opsgate(bob, "watch", "01KZZZZZZZ")
    assert refused.returncode == 4
