"""`opsgate metrics serve`, scraped by a real Prometheus: PromQL sees the store's counts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from opsgate.models import TERMINAL_STATES, ActionState
from opsgate.store.sql import SqlStore
from tests import history
from tests.integration.prom import PrometheusServer, free_port, http_get, prometheus_binary

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
START = datetime(2026, 8, 1, tzinfo=UTC)
END = datetime(2026, 9, 1, tzinfo=UTC)


@dataclass
class Exporter:
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    records: list[history.Record]


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[Exporter]:
    """`python -m opsgate metrics serve` over a seeded SQLite store, until the test ends."""
    url = f"sqlite:///{tmp_path / 'opsgate.db'}"
    store = SqlStore(url)
    try:
        store.migrate()
        records = history.generate(400, seed=3, start=START, end=END)
        history.write(store, records)
    finally:
        store.close()
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")},
        "OPSGATE_DB": url,
    }
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "opsgate", "metrics", "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                pytest.fail(f"metrics serve exited {process.returncode}: {log.read_text()}")
            try:
                if http_get(f"http://127.0.0.1:{port}/metrics")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"metrics serve never answered: {log.read_text()}")
            time.sleep(0.05)
        yield Exporter(port, process, log, records)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def scraping(exporter: Exporter, tmp_path: Path) -> Iterator[PrometheusServer]:
    """A real Prometheus scraping the exporter every second."""
    binary = prometheus_binary()
    if binary is None:
        pytest.fail(
            "prometheus is not installed: run `make system-deps` "
            "(or set OPSGATE_PROMETHEUS_BIN to a prometheus binary)"
        )
    server = PrometheusServer(
        [f"127.0.0.1:{exporter.port}"], tmp_path / "prometheus", job="opsgate", binary=binary
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait_for_value(server: PrometheusServer, query: str, expected: float) -> None:
    """Until `query` returns `expected` (scrapes land every second), or fail with the last."""
    deadline = time.monotonic() + 10
    while True:
        data = server.api_query(query)
        result = data.get("data", {}).get("result", []) if data.get("status") == "success" else []
        value = float(result[0]["value"][1]) if result else None
        if value == expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{query} = {value}, expected {expected}: {data}")
        time.sleep(0.2)


def test_prometheus_scrapes_the_store_counts(
    exporter: Exporter, scraping: PrometheusServer
) -> None:
    records = exporter.records
    blocked = sum(
        d.phase == "propose" and "not_allowlisted" in d.deny_codes
        for r in records
        for d in r.decisions
    )
    succeeded = sum(r.action.state is ActionState.SUCCEEDED for r in records)
    final = sum(r.action.state in TERMINAL_STATES for r in records)
    assert blocked > 0 and succeeded > 0 and final < len(records)

    wait_for_value(scraping, 'opsgate_store_up{job="opsgate"}', 1)
    wait_for_value(scraping, 'sum(opsgate_policy_blocks_total{code="not_allowlisted"})', blocked)
    wait_for_value(scraping, 'sum(opsgate_actions_total{state="succeeded"})', succeeded)
    wait_for_value(scraping, "sum(opsgate_actions_total)", final)
    # Final states as counters, the rest as gauges: together, every action once.
    wait_for_value(
        scraping, "sum(opsgate_actions_total) + sum(opsgate_actions_in_progress)", len(records)
    )

    # SIGTERM (systemd, Kubernetes) stops the server cleanly, like Ctrl-C.
    exporter.process.send_signal(signal.SIGTERM)
    assert exporter.process.wait(timeout=10) == 0
    assert "metrics server stopped" in exporter.log.read_text()
