"""Many workers, crashes at every instant, racing approvals and a database restart:
real `opsgate worker` processes on a real PostgreSQL server, verified against a real
Prometheus scraping the fault service. Nothing lost, nothing run twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from opsgate.errors import StateConflict
from opsgate.executor.executor import RUN_RECOVERY_GRACE
from opsgate.models import ActionState
from tests.integration.fault_service import FaultService
from tests.integration.prom import PrometheusServer
from tests.integration.workers_rig import (
    ALICE,
    BOB,
    CAROL,
    Fleet,
    Processes,
    action_type,
    append_argv,
    audit_verify,
    cli_env,
    opsgate_parallel,
    pid_alive,
    verification,
    wait_until,
    workers_json,
    write_catalog,
)

pytestmark = pytest.mark.integration

S = ActionState
TERMINAL = {s for s in ActionState if s.terminal}

# A healthy service of the session's fault service: ~200 requests/s, no errors.
HEALTHY_RATE = 'sum(rate(http_requests_total{service="checkout"}[4s]))'
HEALTHY_ERRORS = (
    'sum(rate(http_requests_total{service="checkout",code=~"5.."}[4s]))'
    ' / sum(rate(http_requests_total{service="checkout"}[4s]))'
)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Every worker process a test starts, killed (and reaped) at the end."""
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.close()


def healthy_verification(**overrides: Any) -> dict[str, Any]:
    return verification(
        signal_query=HEALTHY_RATE,
        pass_range={"min": 1},
        stop_query=HEALTHY_ERRORS,
        halt_range={"min": 0.5},
        **overrides,
    )


def diagnose(fleet: Fleet, procs: Processes, ids: list[str]) -> Callable[[], str]:
    def describe() -> str:
        counts = Counter(s.value for s in fleet.states(ids).values())
        logs = "\n".join(
            f"--- worker {i} (pid {w.pid}, rc {w.returncode}):\n{w.output()[-3000:]}"
            for i, w in enumerate(procs.started)
        )
        return f"states: {dict(counts)}\n{explain(fleet, ids)}\n{logs}"

    return describe


def explain(fleet: Fleet, ids: list[str], limit: int = 5) -> str:
    """Why actions did not succeed: their execution's outcome and audit trail."""
    lines: list[str] = []
    odd = [i for i, state in fleet.states(ids).items() if state is not S.SUCCEEDED]
    for action_id in odd[:limit]:
        execution = fleet.store.get_execution(action_id)
        lines.append(
            f"{action_id} {fleet.state(action_id).value}: "
            f"{execution.outcome if execution else None} {execution.reason if execution else ''}"
        )
        for event in fleet.events(action_id=action_id):
            at = event.at.strftime("%H:%M:%S.%f")[:-3]
            lines.append(f"    {at} {event.kind} by {event.actor}: {event.data}")
    return "\n".join(lines)


# --- 1. four workers, 300 actions ----------------------------------------------------------


def test_four_workers_run_300_actions_exactly_once(
    tmp_path: Path,
    pg_database: Callable[[], str],
    prometheus: PrometheusServer,
    procs: Processes,
) -> None:
    runs = tmp_path / "runs.txt"
    runs.touch()
    catalog = write_catalog(
        tmp_path / "catalog",
        action_type(
            "restart_service",
            run=append_argv(runs, "{target}"),
            undo=append_argv(tmp_path / "undone.txt", "{target}"),
            verify=healthy_verification(interval="1s", hold="0s"),
        ),
    )
    url = pg_database()
    fleet = Fleet(url, catalog)
    try:
        targets = [f"svc-{i}" for i in range(300)]
        ids = [fleet.propose("restart_service", t).id for t in targets]
        env = cli_env(url, catalog, prometheus.url)
        workers = [procs.worker(env, "--poll", "0.2") for _ in range(4)]
        wait_until(
            lambda: len(fleet.store.list_workers()) == 4,
            30,
            "4 workers to register",
            diagnose=diagnose(fleet, procs, ids),
        )
        # Approved while the workers poll, as in production: they share the work.
        for action_id in ids:
            fleet.gate.approve(action_id, BOB)
        wait_until(
            lambda: procs.still_running(*workers) and set(fleet.states(ids).values()) <= TERMINAL,
            120,
            "all 300 actions to end",
            every=0.5,
            diagnose=diagnose(fleet, procs, ids),
        )
        for worker in workers:
            worker.signal(signal.SIGTERM)
        codes = [worker.wait(30) for worker in workers]
        assert codes == [0, 0, 0, 0], diagnose(fleet, procs, ids)()

        states = fleet.states(ids)
        assert Counter(states.values()) == {S.SUCCEEDED: 300}, explain(fleet, ids)
        # Every run step ran exactly once: one line per target, no more, no less.
        lines = Counter(runs.read_text().split())
        assert lines == dict.fromkeys(targets, 1)
        assert not (tmp_path / "undone.txt").exists()
        # One claim per action, shared between the four workers.
        claims = fleet.events("action.executing")
        assert Counter(e.action_id for e in claims) == dict.fromkeys(ids, 1)
        claimers = Counter(e.actor for e in claims)
        listed = workers_json(env)
        assert sorted(row["status"] for row in listed) == ["stopped"] * 4
        assert {row["pid"] for row in listed} == {w.pid for w in workers}
        assert all(row["leases"] == [] for row in listed)
        assert set(claimers) <= {row["id"] for row in listed}
        assert len(claimers) == 4, claimers
        assert fleet.events("execution.recovered") == []
        verified = audit_verify(env)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        fleet.close()


# --- 2. the crash matrix -------------------------------------------------------------------


@dataclass(frozen=True)
class Crash:
    """A worker dies at one instant; a second worker recovers what it held."""

    failpoint: str | None  # None: the test SIGKILLs the worker while `run` is under way
    worse: bool  # the run makes the target's error ratio jump, so it must be rolled back
    final: ActionState
    runs: int  # how many times `run` started, over both workers
    undos: int
    captures: int = 0
    capture: bool = False
    slow_run: bool = False
    hold: str = "0s"
    # The slow run applies its change (error ratio 0.6) only after sleeping: had it
    # outlived its worker, it would do so after the new owner's undo.
    late_change: bool = False


CRASHES: dict[str, Crash] = {
    "after_claim": Crash("after_claim", False, S.SUCCEEDED, runs=1, undos=0),
    # capture is a read of the prior state: the new owner captures again, then runs once
    "after_capture": Crash(
        "after_capture", False, S.SUCCEEDED, runs=1, undos=0, captures=2, capture=True
    ),
    # run_started_at is stored, then the worker dies before the step starts: the new
    # owner cannot know whether run happened, so it rolls back; run never ran at all
    "after_run_started": Crash("after_run_started", False, S.ROLLED_BACK, runs=0, undos=1),
    "during_run": Crash(None, False, S.ROLLED_BACK, runs=1, undos=1, slow_run=True),
    "during_run_before_its_change": Crash(
        None, False, S.ROLLED_BACK, runs=1, undos=1, slow_run=True, late_change=True
    ),
    # killed after the first verification interval was stored (hold not reached yet):
    # the new owner resumes the verification and it succeeds
    "during_verification": Crash("verify_tick", False, S.SUCCEEDED, runs=1, undos=0, hold="1s"),
    # hold 2s: a worse change must not pass on the first interval, before Prometheus
    # has scraped what it did
    "after_rollback_decided": Crash(
        "after_rollback_decided", True, S.ROLLED_BACK, runs=1, undos=1, hold="2s"
    ),
    "during_rollback_verification": Crash(
        "rollback_tick", True, S.ROLLED_BACK, runs=1, undos=1, hold="2s"
    ),
}
# Where the new owner found each case: (state, run started, run finished).
FOUND: dict[str, tuple[str, bool, bool]] = {
    "after_claim": ("executing", False, False),
    "after_capture": ("executing", False, False),
    "after_run_started": ("executing", True, False),
    "during_run": ("executing", True, False),
    "during_run_before_its_change": ("executing", True, False),
    "during_verification": ("verifying", True, True),
    "after_rollback_decided": ("rolling_back", True, True),
    "during_rollback_verification": ("rolling_back", True, True),
}
# irate: the error ratio of the last scrape interval (1 s), so a flip shows at once
# and a rollback is verified within a scrape or two.
FAST_ERROR_RATIO = (
    'sum(irate(http_requests_total{service="{target}",code=~"5.."}[3s]))'
    ' / sum(irate(http_requests_total{service="{target}"}[3s]))'
)


# Short, because a new owner may undo a run under way only once it has timed out.
CRASH_RUN_TIMEOUT = "6s"


@pytest.fixture(scope="module")
def crash_services(fault_service: FaultService) -> dict[str, str]:
    """A fresh fault-service service per crash case, created once so their rate history
    is ready by the time each case runs."""
    names = {case: f"crash-{case.replace('_', '-')}-{os.getpid()}" for case in CRASHES}
    for name in names.values():
        fault_service.add_service(name)
    return names


def wait_for_rate(prometheus: PrometheusServer, service: str, timeout: float = 15.0) -> None:
    query = FAST_ERROR_RATIO.replace("{target}", service)
    wait_until(
        lambda: bool(prometheus.api_query(query).get("data", {}).get("result")),
        timeout,
        f"an error ratio of {service}",
        every=0.2,
    )


def crash_action(case: Crash, marker: Path, pid_file: Path, fault_url: str) -> dict[str, Any]:
    """restart_service whose steps log `run` / `undo` / `capture` lines to `marker`."""
    set_ratio = '"$1" -m tests.integration.fault_service set --url "$2" --service "$3" --ratio'
    if case.slow_run and case.late_change:
        late = '"$2" -m tests.integration.fault_service set --url "$3" --service "$4" --ratio 0.6'
        run = [
            "/bin/sh", "-c",
            'echo $$ > "$1"; printf "run\\n" >> "$0"; sleep 3; '
            f'printf "applied\\n" >> "$0"; {late}',
            str(marker), str(pid_file), sys.executable, fault_url, "{target}",
        ]  # fmt: skip
    elif case.slow_run:
        run = [
            "/bin/sh", "-c", 'echo $$ > "$1"; printf "run\\n" >> "$0"; sleep 3',
            str(marker), str(pid_file),
        ]  # fmt: skip
    elif case.worse:
        run = [
            "/bin/sh", "-c", f'printf "run\\n" >> "$0" && {set_ratio} 0.6',
            str(marker), sys.executable, fault_url, "{target}",
        ]  # fmt: skip
    else:
        run = append_argv(marker, "run")
    undo = [
        "/bin/sh", "-c", f'printf "undo\\n" >> "$0" && {set_ratio} 0',
        str(marker), sys.executable, fault_url, "{target}",
    ]  # fmt: skip
    capture = ["/bin/sh", "-c", 'printf "capture\\n" >> "$0"; echo 3', str(marker)]
    return action_type(
        "restart_service",
        run=run,
        run_timeout=CRASH_RUN_TIMEOUT,
        undo=undo,
        capture=capture if case.capture else None,
        verify=verification(
            signal_query=FAST_ERROR_RATIO,
            pass_range={"max": 0.05},
            stop_query=FAST_ERROR_RATIO,
            halt_range={"min": 0.3},
            interval="1s",
            hold=case.hold,
            timeout="20s",
        ),
    )


@pytest.mark.parametrize("case_name", list(CRASHES))
def test_a_worker_killed_at_any_instant_is_recovered(
    case_name: str,
    tmp_path: Path,
    pg_database: Callable[[], str],
    prometheus: PrometheusServer,
    fault_service: FaultService,
    crash_services: dict[str, str],
    procs: Processes,
) -> None:
    case = CRASHES[case_name]
    target = crash_services[case_name]
    marker, pid_file = tmp_path / "steps.log", tmp_path / "run.pid"
    marker.touch()
    procs.pid_files.append(pid_file)
    catalog = write_catalog(
        tmp_path / "catalog", crash_action(case, marker, pid_file, fault_service.url)
    )
    url = pg_database()
    fleet = Fleet(url, catalog)
    try:
        wait_for_rate(prometheus, target)
        action_id = fleet.approved("restart_service", target)
        env = cli_env(url, catalog, prometheus.url, lease="2s")
        first = procs.worker(
            cli_env(url, catalog, prometheus.url, lease="2s", failpoints=case.failpoint),
            "--poll",
            "0.2",
        )
        describe = diagnose(fleet, procs, [action_id])
        if case.failpoint is None:
            wait_until(
                lambda: "run" in marker.read_text().split(), 30, "run to start", diagnose=describe
            )
            step_pid = int(pid_file.read_text().split()[0])
            assert pid_alive(step_pid)
            first.process.kill()
            # The run step is in a session of its own, yet it dies with its worker.
            wait_until(
                lambda: not pid_alive(step_pid), 2, "the step to die with its worker",
                diagnose=describe,
            )  # fmt: skip
        wait_until(lambda: first.returncode is not None, 30, "the crash", diagnose=describe)
        assert first.wait(1) == -signal.SIGKILL, describe()
        lapses_at = fleet.store.get_execution(action_id)
        assert lapses_at is not None and lapses_at.finished_at is None
        # Started at once; it takes the action over when the dead worker's lease lapses.
        second = procs.worker(env, "--poll", "0.2")
        wait_until(
            lambda: procs.still_running(second) and fleet.state(action_id) in TERMINAL,
            45,
            "the recovery",
            diagnose=describe,
        )
        assert second.stop() == 0, describe()

        assert fleet.state(action_id) is case.final, explain(fleet, [action_id])
        steps = Counter(marker.read_text().split())
        assert steps["run"] == case.runs, steps
        assert steps["undo"] == case.undos, steps
        assert steps["capture"] == case.captures, steps
        if case.worse or case.late_change:
            # The system is as the action says: rolled back, nothing applied afterwards.
            assert "applied" not in steps
            assert fault_service.state()[target]["error_ratio"] == 0.0

        listed, verified = opsgate_parallel(
            env, ["workers", "--json", "--all"], ["audit", "verify"]
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert listed.returncode == 0, listed.stderr
        rows = {row["pid"]: row for row in json.loads(listed.stdout)}
        dead, rescuer = rows[first.pid], rows[second.pid]
        assert dead["status"] == "lapsed" and dead["leases"] == []
        assert rescuer["status"] == "stopped"
        recovered = fleet.events("execution.recovered", action_id=action_id)
        assert [(e.actor, e.data["dead_worker"]) for e in recovered] == [
            (rescuer["id"], dead["id"])
        ]
        found = recovered[0].data
        assert (found["state"], found["run_started"], found["run_finished"]) == FOUND[case_name]
        # Taken over only once the lease had lapsed, never while it was held.
        assert recovered[0].at > lapses_at.lease_expires_at
        if found["run_started"] and not found["run_finished"]:
            # ... and not before the run under way had timed out (plus the grace).
            assert lapses_at.run_started_at is not None
            assert recovered[0].at >= lapses_at.run_started_at + timedelta(
                seconds=6 + RUN_RECOVERY_GRACE
            )
        execution = fleet.store.get_execution(action_id)
        assert execution is not None and execution.recovered_from == dead["id"]
        assert execution.finished_at is not None
        assert len(fleet.events("action.executing", action_id=action_id)) == 1
    finally:
        fleet.close()


# --- 3. racing approvals -------------------------------------------------------------------

ROUNDS = 20


def race(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads released at the same instant; results or exceptions."""
    barrier = threading.Barrier(len(calls), timeout=10)
    results: list[Any] = [None] * len(calls)

    def one(index: int, call: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            results[index] = call()
        except Exception as exc:  # the outcome of a lost race, inspected by the test
            results[index] = exc

    threads = [threading.Thread(target=one, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    return results


def test_racing_approvers_and_a_racing_cancel_give_one_outcome(
    tmp_path: Path, pg_database: Callable[[], str]
) -> None:
    catalog = write_catalog(
        tmp_path / "catalog",
        # no undo: irreversible, so the default bundle requires two approvals
        action_type("drain_node", run=["true"], undo=None, verify=healthy_verification()),
        action_type("restart_service", run=["true"], undo=["true"], verify=healthy_verification()),
    )
    url = pg_database()
    fleet = Fleet(url, catalog)
    # Each racer has its own connection pool and its own policy interpreter, as two
    # `opsgate approve` processes would.
    bob, carol, alice = Fleet(url, catalog), Fleet(url, catalog), Fleet(url, catalog)
    try:
        # Two approvers, one action that needs both, at the same moment.
        for round_ in range(ROUNDS):
            action = fleet.propose("drain_node", f"node-{round_}")
            assert action.required_approvals == 2
            by_bob, by_carol = race(
                partial(bob.gate.approve, action.id, BOB),
                partial(carol.gate.approve, action.id, CAROL),
            )
            assert not isinstance(by_bob, Exception), by_bob
            assert not isinstance(by_carol, Exception), by_carol
            assert by_bob.counted and by_carol.counted
            # Serialised on the action's row: one saw one approval, the other both.
            assert sorted([by_bob.action.state.value, by_carol.action.state.value]) == [
                "approved",
                "pending_approval",
            ]
            assert fleet.state(action.id) is S.APPROVED
            approvals = fleet.store.approvals_for(action.id)
            assert sorted(a.approver.id for a in approvals) == ["bob", "carol"]
            added = fleet.events("approval.added", action_id=action.id)
            assert sorted(e.data["count"] for e in added) == [1, 2]
            assert sorted(e.actor for e in added) == ["bob", "carol"]
            approved = fleet.events("action.approved", action_id=action.id)
            assert len(approved) == 1 and approved[0].data["approvers"] == ["bob", "carol"]

        # An approval racing the proposer's cancel: whichever commits first wins, and
        # the other either follows it (cancelling an approved action) or is refused.
        orders: Counter[str] = Counter()
        for round_ in range(ROUNDS):
            action = fleet.propose("restart_service", f"svc-{round_}")
            assert action.required_approvals == 1
            approval, cancel = race(
                partial(bob.gate.approve, action.id, BOB),
                partial(alice.gate.cancel, action.id, ALICE, "no longer needed"),
            )
            assert not isinstance(cancel, Exception), cancel
            assert fleet.state(action.id) is S.CANCELLED
            trail = [
                (e.kind, e.from_state, e.to_state)
                for e in fleet.events(action_id=action.id)
                if e.kind != "action.pending_approval"
            ]
            if isinstance(approval, Exception):
                orders["cancel first"] += 1
                assert isinstance(approval, StateConflict), approval
                assert fleet.store.approvals_for(action.id) == []
                assert trail == [("action.cancelled", "pending_approval", "cancelled")]
            else:
                orders["approval first"] += 1
                assert approval.counted and approval.action.state is S.APPROVED
                assert [a.approver.id for a in fleet.store.approvals_for(action.id)] == ["bob"]
                assert trail == [
                    ("approval.added", None, None),
                    ("action.approved", "pending_approval", "approved"),
                    ("action.cancelled", "approved", "cancelled"),
                ]
        assert sum(orders.values()) == ROUNDS
        fleet.assert_audit_ok()
        verified = audit_verify(cli_env(url, catalog, None))
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        for opened in (fleet, bob, carol, alice):
            opened.close()


# --- 4. the database restarts under a running worker ---------------------------------------

PG_CLUSTER = ("15", "main")


def pg_ctl(action: str) -> None:
    extra = ["-m", "fast"] if action == "stop" else []
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, action, *extra],
        check=True,
        capture_output=True,
        timeout=60,
    )


def accepts_connections() -> bool:
    probe = subprocess.run(
        ["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-t", "1"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return probe.returncode == 0


@pytest.fixture
def restartable_postgres(_pg_server: Any) -> Iterator[Callable[[float], None]]:
    """`restart(down_for)`: stop the local cluster (fast), wait, start it again.

    It is started again whatever happens, and the session's admin engine drops its
    (now dead) pooled connections so later tests can create databases.
    """
    if shutil.which("pg_ctlcluster") is None or os.geteuid() != 0:
        pytest.skip("needs root and pg_ctlcluster to restart the local PostgreSQL cluster")

    def restart(down_for: float) -> None:
        try:
            pg_ctl("stop")
            time.sleep(down_for)
        finally:
            pg_ctl("start")
            wait_until(accepts_connections, 60, "PostgreSQL to accept connections", every=0.2)

    try:
        yield restart
    finally:
        if not accepts_connections():
            pg_ctl("start")
            wait_until(accepts_connections, 60, "PostgreSQL to accept connections", every=0.2)
        if _pg_server.engine is not None:
            _pg_server.engine.dispose()


def test_a_worker_carries_on_when_the_database_restarts(
    tmp_path: Path,
    pg_database: Callable[[], str],
    prometheus: PrometheusServer,
    procs: Processes,
    restartable_postgres: Callable[[float], None],
) -> None:
    runs = tmp_path / "runs.txt"
    runs.touch()
    catalog = write_catalog(
        tmp_path / "catalog",
        action_type(
            "restart_service",
            run=append_argv(runs, "{target}"),
            undo=append_argv(tmp_path / "undone.txt", "{target}"),
            verify=healthy_verification(interval="1s", hold="8s", timeout="60s"),
        ),
    )
    url = pg_database()
    fleet = Fleet(url, catalog)
    try:
        targets = [f"svc-{i}" for i in range(8)]
        ids = [fleet.approved("restart_service", t) for t in targets]
        env = cli_env(url, catalog, prometheus.url, lease="5s")
        worker = procs.worker(env, "--poll", "0.2")
        describe = diagnose(fleet, procs, ids)
        wait_until(
            lambda: set(fleet.states(ids).values()) == {S.VERIFYING},
            30,
            "every action to be verifying",
            diagnose=describe,
        )
        time.sleep(1.5)  # a verification interval or so stored before the restart
        restartable_postgres(2.0)
        wait_until(
            lambda: procs.still_running(worker) and set(fleet.states(ids).values()) <= TERMINAL,
            60,
            "every action to end after the restart",
            every=0.5,
            diagnose=describe,
        )
        assert worker.returncode is None, describe()  # it carried on
        assert worker.stop() == 0, describe()
        states = fleet.states(ids)
        assert set(states.values()) <= {S.SUCCEEDED, S.ROLLED_BACK}, explain(fleet, ids)
        assert Counter(runs.read_text().split()) == dict.fromkeys(targets, 1)
        for action_id in ids:
            execution = fleet.store.get_execution(action_id)
            assert execution is not None and execution.finished_at is not None
        fleet.assert_audit_ok()
        verified = audit_verify(env)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        fleet.close()
