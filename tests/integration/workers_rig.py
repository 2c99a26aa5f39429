"""Helpers for the many-workers tests and benchmark: catalogs, real `opsgate worker`
processes, proposing and approving through the Python API, and waiting.

Everything here drives real parts: `opsgate` subprocesses, a real store, the default
Rego bundle. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from opsgate.audit import verify_chain
from opsgate.catalog import load_catalog
from opsgate.gate import Gate
from opsgate.models import Action, ActionState, AuditEvent, Identity
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.preconditions import PreconditionRegistry
from opsgate.store import Store, open_store

ROOT = Path(__file__).resolve().parents[2]
ALICE = Identity(id="alice", kind="human")
BOB = Identity(id="bob", kind="human")
CAROL = Identity(id="carol", kind="human")
S = ActionState

# Appends its first argument as one line to the file named by $0 (one write(2) call on
# an O_APPEND descriptor: lines from concurrent processes never interleave).
APPEND_LINE = 'printf "%s\\n" "$1" >> "$0"'


def append_argv(path: Path, line: str) -> list[str]:
    """An argv that appends `line` (placeholders allowed) to `path`."""
    return ["/bin/sh", "-c", APPEND_LINE, str(path), line]


def verification(
    *,
    signal_query: str,
    pass_range: Mapping[str, float],
    stop_query: str,
    halt_range: Mapping[str, float],
    interval: str = "1s",
    hold: str = "0s",
    timeout: str = "20s",
    failure_limit: int = 2,
    error_limit: int = 2,
) -> dict[str, Any]:
    return {
        "interval": interval,
        "hold": hold,
        "timeout": timeout,
        "signals": [{"name": "signal", "query": signal_query, "pass": dict(pass_range)}],
        "stop_conditions": [{"name": "stop", "query": stop_query, "halt": dict(halt_range)}],
        "failure_limit": failure_limit,
        "error_limit": error_limit,
    }


def action_type(
    name: str,
    *,
    run: Sequence[str],
    undo: Sequence[str] | None,
    verify: Mapping[str, Any],
    capture: Sequence[str] | None = None,
    params: Mapping[str, Any] | None = None,
    run_timeout: str = "20s",
) -> dict[str, Any]:
    """A catalog entry (name must be allowlisted in `staging` by the default bundle)."""
    document: dict[str, Any] = {
        "name": name,
        "risk": "medium",
        "params": dict(params or {}),
        "run": {"argv": list(run), "timeout": run_timeout},
        "verification": dict(verify),
    }
    if capture is not None:
        document["capture"] = {"argv": list(capture), "as": "previous", "timeout": "10s"}
    if undo is not None:
        document["undo"] = {"argv": list(undo), "timeout": "20s"}
    return document


def write_catalog(directory: Path, *documents: Mapping[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for document in documents:
        (directory / f"{document['name']}.yaml").write_text(json.dumps(document))
    return directory


def cli_env(
    url: str,
    catalog: Path,
    prometheus_url: str | None,
    *,
    user: str = "bob",
    lease: str = "2s",
    failpoints: str | None = None,
) -> dict[str, str]:
    """The environment of an `opsgate` process; no OPSGATE_* leaks in from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")}
    env.update(
        {
            "OPSGATE_DB": url,
            "OPSGATE_CATALOG": str(catalog),
            "OPSGATE_POLICIES": str(ROOT / "policies"),
            "OPSGATE_IDENTITY": "env",
            "OPSGATE_USER": user,
            "OPSGATE_LEASE": lease,
            "PYTHONUNBUFFERED": "1",
        }
    )
    if prometheus_url is not None:
        env["OPSGATE_PROMETHEUS_URL"] = prometheus_url
    if failpoints:
        env["OPSGATE_FAILPOINTS"] = failpoints
    return env


def opsgate(
    env: Mapping[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "opsgate", *args],
        env=dict(env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def opsgate_parallel(
    env: Mapping[str, str], *commands: Sequence[str], timeout: float = 60
) -> list[subprocess.CompletedProcess[str]]:
    """Several `opsgate` commands at once (each is mostly interpreter start-up)."""
    started = [
        (
            list(args),
            subprocess.Popen(
                [sys.executable, "-m", "opsgate", *args],
                env=dict(env),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for args in commands
    ]
    done: list[subprocess.CompletedProcess[str]] = []
    for args, process in started:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        done.append(subprocess.CompletedProcess(args, process.returncode, out, err))
    return done


class WorkerProcess:
    """One `opsgate worker` process; its output goes to `log` (read it on failure)."""

    def __init__(self, env: Mapping[str, str], log: Path, *args: str) -> None:
        self.log = log
        self._out: IO[bytes] = open(log, "wb")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "opsgate", "worker", *args],
            env=dict(env),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is not None:
                self._out.close()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (the worker drains), then SIGKILL if it does not exit in time."""
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.wait(10)


class Processes:
    """Every worker a test starts; `close()` (in a fixture's finally) stops the rest."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[WorkerProcess] = []
        self.pid_files: list[Path] = []  # run steps that write their pid (own session)

    def worker(self, env: Mapping[str, str], *args: str) -> WorkerProcess:
        log = self.directory / f"worker-{len(self.started)}.log"
        started = WorkerProcess(env, log, *args)
        self.started.append(started)
        return started

    def still_running(self, *workers: WorkerProcess) -> bool:
        """True; fails at once, with its log, if one of these workers has exited."""
        for worker in workers:
            if worker.returncode is not None:
                raise AssertionError(
                    f"worker pid {worker.pid} exited with {worker.returncode}:\n"
                    + worker.output()[-3000:]
                )
        return True

    def close(self) -> None:
        for started in self.started:
            if started.returncode is None:
                started.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                started.wait(10)
        for pid_file in self.pid_files:
            kill_session(pid_file)


def kill_session(pid_file: Path) -> None:
    """SIGKILL the process group a run step recorded (runners start a new session)."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0): look at its state.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    every: float = 0.1,
    diagnose: Callable[[], str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            detail = f"\n{diagnose()}" if diagnose is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(every)


class Fleet:
    """A migrated store and a Gate on it, to propose and approve quickly in-process."""

    def __init__(self, url: str, catalog: Path) -> None:
        self.url = url
        self.catalog = catalog
        self.store: Store = open_store(url)
        self.store.migrate()
        self.gate = Gate(
            store=self.store,
            catalog=load_catalog(catalog),
            engine=EmbeddedEngine(ROOT / "policies"),
            preconditions=PreconditionRegistry({}),
        )

    def propose(self, action: str, target: str, **params: Any) -> Action:
        outcome = self.gate.propose(
            {
                "action": action,
                "target": target,
                "environment": "staging",
                "params": params,
                "reason": "workers integration test",
            },
            ALICE,
        )
        assert outcome.action.state is S.PENDING_APPROVAL, outcome.decision.deny
        return outcome.action

    def approved(self, action: str, target: str, **params: Any) -> str:
        proposed = self.propose(action, target, **params)
        self.gate.approve(proposed.id, BOB)
        if proposed.required_approvals > 1:
            self.gate.approve(proposed.id, CAROL)
        current = self.store.get_action(proposed.id)
        assert current is not None and current.state is S.APPROVED
        return proposed.id

    def states(self, ids: Iterable[str]) -> dict[str, ActionState]:
        wanted = set(ids)
        found = {a.id: a.state for a in self.store.list_actions(limit=100_000) if a.id in wanted}
        return found

    def state(self, action_id: str) -> ActionState:
        action = self.store.get_action(action_id)
        assert action is not None
        return action.state

    def events(self, kind: str | None = None, action_id: str | None = None) -> list[AuditEvent]:
        return [
            e
            for e in self.store.audit_events(action_id=action_id)
            if kind is None or e.kind == kind
        ]

    def assert_audit_ok(self) -> None:
        report = verify_chain(list(self.store.audit_events()), head=self.store.audit_head())
        assert report.ok, report

    def close(self) -> None:
        self.store.close()


def workers_json(env: Mapping[str, str]) -> list[dict[str, Any]]:
    listed = opsgate(env, "workers", "--json", "--all")
    assert listed.returncode == 0, listed.stderr
    rows: list[dict[str, Any]] = json.loads(listed.stdout)
    return rows


def audit_verify(env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return opsgate(env, "audit", "verify")
