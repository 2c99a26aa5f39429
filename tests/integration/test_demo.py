"""`opsgate demo` end to end: the real CLI in subprocesses, a real Prometheus, the fast
profile; then the story is checked in the demo's own database, and nothing is left running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from opsgate.demo.processes import port_open
from opsgate.demo.prometheus import find_prometheus
from opsgate.models import Action, ActionState
from opsgate.store import Store, open_store

ROOT = Path(__file__).resolve().parents[2]
# Generous: a loaded 2-core machine; the fast profile itself takes well under a minute.
DEMO_TIMEOUT = 300.0
_PORTS = re.compile(r"^\s+(checkout service|prometheus)\s+http://127\.0\.0\.1:(\d+)", re.M)


@dataclass
class DemoRun:
    workdir: Path
    returncode: int
    output: str
    elapsed: float

    @property
    def ports(self) -> dict[str, int]:
        return {name: int(port) for name, port in _PORTS.findall(self.output)}


def demo_env() -> dict[str, str]:
    """The test's environment plus stray OPSGATE_* settings the demo must not pick up."""
    return {
        **os.environ,
        "OPSGATE_DB": "sqlite:////nonexistent/should-not-be-used.db",
        "OPSGATE_CATALOG": "/nonexistent/catalog",
        "OPSGATE_USER": "mallory",
    }


def demo_argv(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "opsgate", "demo", "--profile", "fast", "--workdir", str(workdir)]


def processes_in(workdir: Path) -> list[str]:
    """Live processes that name `workdir` on their command line or run inside it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or entry.name == str(os.getpid()):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone meanwhile, or not ours to look at
            continue
        if str(workdir) in cmdline or cwd == str(workdir) or cwd.startswith(f"{workdir}/"):
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    if find_prometheus() is None:
        pytest.fail(
            "prometheus is not installed: run `make system-deps` "
            "(or set OPSGATE_PROMETHEUS_BIN to a prometheus binary)"
        )
    workdir = tmp_path_factory.mktemp("demo") / "work"
    started = time.monotonic()
    done = subprocess.run(
        demo_argv(workdir),
        cwd=ROOT,
        env=demo_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        check=False,
    )
    elapsed = time.monotonic() - started
    print(f"opsgate demo --profile fast took {elapsed:.1f}s")
    return DemoRun(workdir, done.returncode, done.stdout + done.stderr, elapsed)


@pytest.fixture
def store(demo_run: DemoRun) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{demo_run.workdir / 'opsgate.db'}")
    try:
        yield opened
    finally:
        opened.close()


def by_type(store: Store) -> dict[str, Action]:
    actions = store.list_actions(limit=100)
    assert len({a.action_type for a in actions}) == len(actions), actions
    return {a.action_type: a for a in actions}


def test_the_demo_runs_to_the_end(demo_run: DemoRun) -> None:
    assert demo_run.returncode == 0, demo_run.output[-4000:]
    assert "demo finished" in demo_run.output
    assert "audit chain ok" in demo_run.output
    assert set(demo_run.ports) == {"checkout service", "prometheus"}, demo_run.output[:2000]


def test_the_agents_rollback_was_approved_and_verified(demo_run: DemoRun, store: Store) -> None:
    action = by_type(store)["rollback_deploy"]
    assert action.state is ActionState.SUCCEEDED
    assert (action.proposer.id, action.proposer.kind) == ("demo-agent", "agent")
    # Two: the agent is on the trust ladder's probation for rollback_deploy.
    assert [a.approver.id for a in store.approvals_for(action.id)] == ["bob", "carol"]
    assert action.required_approvals == 2
    execution = store.get_execution(action.id)
    assert execution is not None and execution.outcome == "succeeded"
    assert execution.captured == {"previous_version": "v2.5.0"}
    measurements = store.measurements_for(action.id)
    # stop conditions are also measured while the run step is still going, when a
    # scrape lands inside it: timing decides whether there is a "run" phase at all
    assert {"baseline", "verify"} <= {m.phase for m in measurements}
    assert {m.phase for m in measurements} <= {"baseline", "run", "verify"}
    during_run = [m for m in measurements if m.phase == "run"]
    assert all(m.kind == "stop_condition" for m in during_run), during_run
    assert all(m.outcome != "fail" or m.not_counted for m in during_run), during_run
    # judged as a mitigation: against the bad release's own error rate, not a fixed level
    assert execution.baseline is not None and execution.baseline["error_rate"] is not None
    assert execution.baseline["error_rate"] >= 0.1
    verify = [m for m in measurements if m.phase == "verify" and m.name == "error_rate"]
    assert verify[0].not_counted == "pre_change"  # the window still held the bad release
    assert [m.outcome for m in verify if m.not_counted is None].count("fail") <= 2


@pytest.mark.parametrize(
    ("action_type", "code"),
    [("drain_node", "not_allowlisted"), ("scale_deployment", "param_out_of_bounds")],
)
def test_the_agents_other_proposals_were_blocked(
    demo_run: DemoRun, store: Store, action_type: str, code: str
) -> None:
    action = by_type(store)[action_type]
    assert action.state is ActionState.BLOCKED
    decisions = store.decisions_for(action.id)
    assert [d.phase for d in decisions] == ["propose"]
    assert code in decisions[0].deny_codes
    assert f"deny {code}:" in demo_run.output  # the CLI output showed it
    assert store.get_execution(action.id) is None


def test_the_flag_change_was_stopped_and_rolled_back(demo_run: DemoRun, store: Store) -> None:
    action = by_type(store)["toggle_feature_flag"]
    assert action.state is ActionState.ROLLED_BACK
    execution = store.get_execution(action.id)
    assert execution is not None
    assert execution.outcome == "stopped"
    assert execution.trigger_name == "error_spike"
    assert execution.trigger_value is not None and execution.trigger_value >= 0.2
    assert execution.captured == {"previous_enabled": False}  # typed: a JSON boolean
    assert execution.undo_error is None
    assert execution.rollback_time is not None and execution.rollback_time > 0
    assert f"rollback time {execution.rollback_time:.1f}s" in demo_run.output
    phases = {m.phase for m in store.measurements_for(action.id)}
    assert "rollback" in phases


def test_the_html_report_was_written(demo_run: DemoRun) -> None:
    report = demo_run.workdir / "report.html"
    assert report.stat().st_size > 10_000
    assert "<html" in report.read_text(encoding="utf-8")[:2000].lower()
    assert f"HTML report: {report}" in demo_run.output


def test_nothing_is_left_running(demo_run: DemoRun) -> None:
    for name, port in demo_run.ports.items():
        assert not port_open(port), f"{name} still listens on {port}"
    assert processes_in(demo_run.workdir) == []


def test_sigterm_mid_run_stops_everything(tmp_path: Path) -> None:
    if find_prometheus() is None:
        pytest.fail("prometheus is not installed: run `make system-deps`")
    workdir = tmp_path / "work"
    process = subprocess.Popen(
        demo_argv(workdir),
        cwd=ROOT,
        env=demo_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    running = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            # The first `opsgate run` is under way: a child, Prometheus and the service.
            if "verify hold" in line:
                running.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert running.wait(DEMO_TIMEOUT), "".join(lines)[-3000:]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 130, "".join(lines)[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    output = "".join(lines)
    assert "interrupted: stopping everything the demo started" in output
    ports = {name: int(port) for name, port in _PORTS.findall(output)}
    assert set(ports) == {"checkout service", "prometheus"}
    for name, port in ports.items():
        assert not port_open(port), f"{name} still listens on {port}"
    assert processes_in(workdir) == []
