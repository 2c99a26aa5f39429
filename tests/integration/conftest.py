"""Integration fixtures: a fault service, a real Prometheus scraping it, and the execution
rig over both."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.execution_rig import Rig
from tests.integration.fault_service import FaultService
from tests.integration.prom import PrometheusServer, prometheus_binary

# Services the session fault service serves from the start. A test that needs a
# fresh rate history (no earlier faults in the [1m] window) adds its own service.
SERVICES = ("checkout", "cart", "payments")


@pytest.fixture(scope="session")
def fault_service() -> Iterator[FaultService]:
    """One fault service for the session, 127.0.0.1 on a free port."""
    with FaultService(SERVICES) as service:
        yield service


@pytest.fixture(scope="session")
def _prometheus_session(
    fault_service: FaultService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    binary = prometheus_binary()
    if binary is None:
        pytest.fail(
            "prometheus is not installed: run `make system-deps` "
            "(or set OPSGATE_PROMETHEUS_BIN to a prometheus binary)"
        )
    server = PrometheusServer(
        [fault_service.address], tmp_path_factory.mktemp("prometheus"), binary=binary
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prometheus(_prometheus_session: PrometheusServer) -> PrometheusServer:
    """The session's Prometheus, scraping `fault_service` every second.

    A test may stop and restart it (`stop()`, `start()`); if a test leaves it stopped,
    the next test gets it restarted and scraping again.
    """
    if not _prometheus_session.running:
        _prometheus_session.start()
    return _prometheus_session


@pytest.fixture
def prometheus_factory(
    fault_service: FaultService, tmp_path: Path
) -> Iterator[Callable[..., PrometheusServer]]:
    """Start extra Prometheus servers (own port and TSDB); all stopped after the test.

    `prometheus_factory(wait_for_scrape=False)` skips waiting for the first scrape
    (Prometheus applies new scrape targets only every 5 s, so that wait costs ~6 s).
    """
    servers: list[PrometheusServer] = []

    def make(*, wait_for_scrape: bool = True) -> PrometheusServer:
        server = PrometheusServer([fault_service.address], tmp_path / f"prometheus-{len(servers)}")
        servers.append(server)
        return server.start(wait_for_scrape=wait_for_scrape)

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def rig(
    tmp_path: Path,
    sqlite_url: str,
    prometheus: PrometheusServer,
    fault_service: FaultService,
) -> Iterator[Rig]:
    """A worker engine on SQLite and the session's Prometheus (files with their own
    `rig` fixture override this one)."""
    rig = Rig(tmp_path, sqlite_url, prometheus, fault_service)
    yield rig
    rig.close()
