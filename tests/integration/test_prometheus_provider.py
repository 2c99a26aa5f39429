"""PrometheusProvider against a real Prometheus scraping the fault service."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator

import pytest

from opsgate.verification.prometheus import PrometheusProvider
from opsgate.verification.promql import render_query
from opsgate.verification.provider import QueryResult
from tests.integration.fault_service import FaultService
from tests.integration.prom import PrometheusServer

pytestmark = pytest.mark.integration

ERROR_RATE = (
    'sum(rate(http_requests_total{service="{target}",code=~"5.."}[1m])) '
    '/ sum(rate(http_requests_total{service="{target}"}[1m]))'
)


@pytest.fixture
def provider(prometheus: PrometheusServer) -> Iterator[PrometheusProvider]:
    with PrometheusProvider(prometheus.url, timeout=2.0) as p:
        yield p


def error_rate(target: str) -> str:
    return render_query(ERROR_RATE, {"target": target})


def poll(
    provider: PrometheusProvider,
    query: str,
    until: Callable[[QueryResult], bool],
    timeout: float = 15.0,
) -> tuple[QueryResult, list[QueryResult]]:
    """Query every 0.25 s until `until(result)`; returns the last result and all of them."""
    seen: list[QueryResult] = []
    deadline = time.monotonic() + timeout
    while True:
        result = provider.query_many([query])[query]
        seen.append(result)
        if until(result) or time.monotonic() > deadline:
            return result, seen
        time.sleep(0.25)


def fresh_service(fault_service: FaultService, prefix: str) -> str:
    """A service with no history, so a [1m] rate reflects only this test's faults."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    fault_service.add_service(name)
    return name


def test_healthy_service_error_rate_is_zero(provider: PrometheusProvider) -> None:
    result, _ = poll(provider, error_rate("cart"), lambda r: r.value is not None)
    assert result.error is None
    assert result.value == pytest.approx(0.0, abs=1e-12)


def test_error_rate_rises_toward_the_injected_ratio(
    provider: PrometheusProvider, fault_service: FaultService
) -> None:
    service = fresh_service(fault_service, "rise")
    query = error_rate(service)
    try:
        baseline, _ = poll(provider, query, lambda r: r.value is not None)
        assert baseline.error is None
        assert baseline.value == pytest.approx(0.0, abs=1e-12)

        fault_service.set_error_ratio(service, 0.5)
        started = time.monotonic()
        result, seen = poll(provider, query, lambda r: (r.value or 0.0) > 0.3, timeout=20)
        assert result.value is not None and result.value > 0.3, seen
        assert time.monotonic() - started < 20
        values = [r.value for r in seen if r.value is not None]
        assert max(values) <= 0.5 + 1e-9
        assert all(r.error is None for r in seen)
    finally:
        fault_service.set_error_ratio(service, 0.0)


def test_latency_histogram_is_scraped(provider: PrometheusProvider) -> None:
    template = (
        "histogram_quantile(0.99, sum by (le) "
        '(rate(http_request_duration_seconds_bucket{service="{target}"}[1m])))'
    )
    query = render_query(template, {"target": "cart"})  # 20 ms per request
    result, _ = poll(provider, query, lambda r: r.value is not None)
    assert result.value is not None and 0.01 < result.value <= 0.025


def test_unknown_service_is_inconclusive(provider: PrometheusProvider) -> None:
    query = error_rate("no-such-service")
    result = provider.query_many([query])[query]
    assert result == QueryResult(value=None, error=None, at=result.at)


def test_invalid_query_is_an_error(provider: PrometheusProvider) -> None:
    results = provider.query_many(["sum(", "rate(http_requests_total[1m]"])
    for result in results.values():
        assert result.value is None
        assert result.error is not None
        assert "HTTP 400" in result.error and "parse error" in result.error


def test_several_series_is_an_error_not_a_pick(provider: PrometheusProvider) -> None:
    query = 'http_requests_total{service="checkout"}'  # code="200" and code="500"
    result = provider.query_many([query])[query]
    assert result.value is None
    assert result.error == "query returned 2 series; a signal must return one"


def test_scalar_results_and_nan(provider: PrometheusProvider) -> None:
    results = provider.query_many(["scalar(vector(0.25))", "vector(1) / 0", "vector(0) / 0"])
    assert results["scalar(vector(0.25))"].value == 0.25
    assert results["vector(1) / 0"].value == float("inf")
    nan = results["vector(0) / 0"]
    assert (nan.value, nan.error) == (None, None)  # NaN: inconclusive


@pytest.mark.parametrize(
    "payload",
    [
        'checkout"} or vector(1) or {x="',
        'nope"} or vector(1) or up{job="none',
        "checkout\\",
        'x"}\n) or vector(1) # ',
    ],
)
def test_injected_promql_stays_a_literal_label_value(
    provider: PrometheusProvider, payload: str
) -> None:
    for template in (ERROR_RATE, 'sum(http_requests_total{service=~"{target}"})'):
        query = render_query(template, {"target": payload})
        result = provider.query_many([query])[query]
        assert (result.value, result.error) == (None, None), query


def test_the_injection_payload_is_real(provider: PrometheusProvider) -> None:
    """Naive substitution of the same payload does change the query: it returns 1."""
    payload = 'nope"} or vector(1) or up{job="none'
    naive = 'sum(http_requests_total{service="{target}"})'.replace("{target}", payload)
    assert provider.query_many([naive])[naive].value == 1.0
    safe = render_query('sum(http_requests_total{service="{target}"})', {"target": payload})
    assert provider.query_many([safe])[safe].value is None


def test_identical_queries_are_sent_once(
    provider: PrometheusProvider, prometheus: PrometheusServer
) -> None:
    def served() -> float:
        return prometheus.self_metric("prometheus_http_requests_total", handler="/api/v1/query")

    a, b = error_rate("checkout"), error_rate("cart")
    before = served()
    results = provider.query_many([a, b, a, a, b])
    assert set(results) == {a, b}
    # Prometheus counts a request after it answered it: give the counter a moment.
    deadline = time.monotonic() + 2
    while served() - before < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    assert served() - before == 2


def test_check_health(provider: PrometheusProvider) -> None:
    health = provider.check_health()
    assert health.ok, health.detail


def test_stopped_prometheus_gives_errors_not_exceptions(
    prometheus_factory: Callable[..., PrometheusServer],
) -> None:
    server = prometheus_factory(wait_for_scrape=False)
    with PrometheusProvider(server.url, timeout=1.0) as provider:
        queries = ["vector(1)", error_rate("checkout")]
        assert provider.query_many(queries)["vector(1)"].value == 1.0

        server.stop()
        started = time.monotonic()
        results = provider.query_many(queries)
        assert time.monotonic() - started < 3  # no retry storm
        for result in results.values():
            assert result.value is None
            assert result.error is not None and result.error.startswith("unreachable")
        health = provider.check_health()
        assert not health.ok and health.detail.startswith("unreachable")

        server.start(wait_for_scrape=False)
        assert provider.query_many(queries)["vector(1)"].value == 1.0
        assert provider.check_health().ok
