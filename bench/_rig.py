"""Shared wiring for the execution benchmarks: a fault service, a real Prometheus
scraping it (1 s), a store, a catalog written on the fly, a gate and an executor.

Used by `bench/reaction.py` and `bench/fanout.py`; run them from anywhere, the repo
root is put on `sys.path` here so `tests.integration` (the fault service and the
Prometheus launcher the integration tests use) is importable.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from opsgate.catalog import Catalog, load_catalog  # noqa: E402
from opsgate.gate import Gate  # noqa: E402
from opsgate.models import ActionState, Identity  # noqa: E402
from opsgate.policies.embedded import EmbeddedEngine  # noqa: E402
from tests.integration.fault_service import FaultService  # noqa: E402
from tests.integration.prom import PrometheusServer, prometheus_binary  # noqa: E402

ALICE = Identity(id="alice", kind="human")  # proposer (sre)
BOB = Identity(id="bob", kind="human")  # approver (sre)
ENVIRONMENT = "staging"


def error_ratio(label: str, window: str, fn: str = "rate") -> str:
    """The 5xx share of one service's requests; `label` is a placeholder such as
    `{target}`. The signal and the stop condition use this same text, so a tick sends
    it once for both."""
    return (
        f'sum({fn}(http_requests_total{{service="{label}",code=~"5.."}}[{window}]))'
        f' / sum({fn}(http_requests_total{{service="{label}"}}[{window}]))'
    )


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest sample with at least q of them at or below
    it (p90 of 10 runs is the 9th fastest)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def sigterm_as_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so every `finally` below stops what it started."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


@contextmanager
def fault_and_prometheus(
    services: Iterable[str], workdir: Path
) -> Iterator[tuple[FaultService, PrometheusServer]]:
    """A fault service and a Prometheus scraping it every second, both on 127.0.0.1
    free ports; both stopped on the way out, whatever happens."""
    binary = prometheus_binary()
    if binary is None:
        raise SystemExit("prometheus is not installed (apt install prometheus)")
    faults = FaultService(services)
    faults.start()
    try:
        server = PrometheusServer([faults.address], workdir / "prometheus", binary=binary)
        server.start()
        try:
            yield faults, server
        finally:
            server.stop()
    finally:
        faults.stop()


def wait_for_values(server: PrometheusServer, queries: Iterable[str], timeout: float) -> float:
    """Until every query returns a sample (a rate needs two scrapes in its window).
    Returns the seconds waited."""
    started = time.monotonic()
    pending = list(queries)
    while pending:
        pending = [q for q in pending if not server.api_query(q).get("data", {}).get("result")]
        if not pending:
            break
        if time.monotonic() - started > timeout:
            raise SystemExit(f"Prometheus has no value for {pending[0]} after {timeout:g}s")
        time.sleep(0.2)
    return time.monotonic() - started


def write_catalog(directory: Path, documents: Iterable[Mapping[str, Any]]) -> Catalog:
    directory.mkdir(parents=True, exist_ok=True)
    for document in documents:
        (directory / f"{document['name']}.yaml").write_text(json.dumps(document))
    return load_catalog(directory)


def make_gate(store: Any, catalog: Catalog) -> Gate:
    """A gate with the default Rego bundle (`policies/`) and no live preconditions."""
    return Gate(store=store, catalog=catalog, engine=EmbeddedEngine(ROOT / "policies"))


def propose_approved(
    gate: Gate, action: str, target: str, params: Mapping[str, Any], reason: str
) -> str:
    """Propose as alice, approve as bob: the id of an approved action."""
    outcome = gate.propose(
        {
            "action": action,
            "target": target,
            "environment": ENVIRONMENT,
            "params": dict(params),
            "reason": reason,
        },
        ALICE,
    )
    if outcome.action.state is not ActionState.PENDING_APPROVAL:
        raise SystemExit(f"proposal of {action} on {target} refused: {outcome.decision.deny}")
    approved = gate.approve(outcome.action.id, BOB)
    if approved.action.state is not ActionState.APPROVED:
        raise SystemExit(f"{outcome.action.id} is {approved.action.state.value} after approval")
    return str(outcome.action.id)


def scrape_phase(server: PrometheusServer, job: str = "fault") -> float | None:
    """Where in the wall-clock second Prometheus scrapes the fault service (0..1 s)."""
    data = server.api_query(f'timestamp(up{{job="{job}"}})')
    result = data.get("data", {}).get("result") or []
    if not result:
        return None
    return float(result[0]["value"][1]) % 1.0


def monotonic_grid_phase(interval: float = 1.0) -> float:
    """Where in the wall-clock second the hub's grid (k * interval on the monotonic
    clock) falls, for an interval that divides 1 s."""
    return (time.time() - time.monotonic()) % interval


def child_pythonpath() -> None:
    """Runner steps started by the executor (`python -m tests.integration...`) inherit
    this environment: let them import from the repo root wherever the bench runs."""
    current = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + current if current else "")


def pid_tag() -> str:
    return str(os.getpid())


def _git(*args: str) -> str:
    import subprocess

    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def postgres_version(url: str) -> str:
    """The server's version string, e.g. `15.20 (Debian 15.20-0+deb12u1)`."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("SHOW server_version")).scalar_one())
    finally:
        engine.dispose()


def run_facts(*, postgres_url: str | None = None) -> str:
    """What a reader needs to reproduce a figure: commit (and whether the tree had
    uncommitted changes), machine, interpreter, database, load, time."""
    import platform
    import subprocess
    from datetime import UTC, datetime

    try:
        commit = _git("rev-parse", "--short=12", "HEAD")
        if _git("status", "--porcelain", "--untracked-files=no"):
            commit += " (dirty: uncommitted changes)"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    database = ""
    if postgres_url is not None:
        try:
            database = f", PostgreSQL {postgres_version(postgres_url)}"
        except Exception as exc:  # a fact line must not stop the benchmark
            database = f", PostgreSQL version unknown ({type(exc).__name__})"
    try:
        load = ", load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = ""
    return (
        f"commit {commit}; {_cpu_model()}, {os.cpu_count()} cores, {platform.machine()}, "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}"
        f"{database}{load}; {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}"
    )


def print_facts(name: str, rounds: str, *, postgres_url: str | None = None) -> None:
    """The header every benchmark prints before its figures."""
    print(f"{name}: {run_facts(postgres_url=postgres_url)}")
    print(f"{name}: rounds: {rounds}", flush=True)


def spread(samples: Sequence[float], unit: str = "ms", scale: float = 1.0, digits: int = 2) -> str:
    """min / median / p90 / p99 / max (nearest rank) and the count, in `unit`."""
    if not samples:
        return "no samples"
    ordered = sorted(samples)
    median = (
        ordered[(len(ordered) - 1) // 2]
        if len(ordered) % 2
        else ((ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2)
    )
    figures = [
        ("min", ordered[0]),
        ("median", median),
        ("p90", percentile(ordered, 0.9)),
        ("p99", percentile(ordered, 0.99)),
        ("max", ordered[-1]),
    ]
    text = " / ".join(f"{value * scale:.{digits}f}" for _, value in figures)
    return f"min/median/p90/p99/max {text} {unit} (n={len(ordered)})"
