from __future__ import annotations

import math
import socket
from datetime import UTC, datetime

import pytest
import requests

from opsgate.testing_signals import StaticSignalProvider
from opsgate.tls import PinnedCA
from opsgate.verification.prometheus import PrometheusProvider
from opsgate.verification.provider import QueryResult, SignalProvider, result_from_samples

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("data", "value", "error"),
    [
        ([], None, None),
        ([{"metric": {}, "value": [1.0, "0.25"]}], 0.25, None),
        ([{"metric": {}, "value": [1.0, "NaN"]}], None, None),
        ([{"metric": {}, "value": [1.0, "+Inf"]}], math.inf, None),
        ([1.0, "3"], 3.0, None),  # scalar
        (
            [{"metric": {"a": "1"}, "value": [1, "1"]}, {"metric": {"a": "2"}, "value": [1, "2"]}],
            None,
            "query returned 2 series; a signal must return one",
        ),
        (
            [{"metric": {}, "values": [[1, "1"]]}],
            None,
            "query returned a range vector; a signal must return an instant value",
        ),
        ([1.0, "hello"], None, "cannot read query result: could not convert string"),
        ({"weird": True}, None, "unexpected query result dict"),
    ],
)
def test_result_from_samples(data: object, value: float | None, error: str | None) -> None:
    result = result_from_samples(data, T0)
    assert result.value == value
    if error is None:
        assert result.error is None
    else:
        assert result.error is not None and result.error.startswith(error)
    assert result.at == T0


def test_static_provider() -> None:
    boom = ConnectionError("refused")
    provider = StaticSignalProvider(
        {"a": 0.5, "b": None, "c": boom, "d": math.nan}, clock=lambda: T0
    )
    assert isinstance(provider, SignalProvider)
    results = provider.query_many(["a", "b", "c", "d", "a", "zzz"])
    assert results["a"] == QueryResult(0.5, None, T0)
    assert results["b"] == QueryResult(None, None, T0)
    assert results["c"] == QueryResult(None, "ConnectionError: refused", T0)
    assert results["d"] == QueryResult(None, None, T0)
    assert results["zzz"].error is not None
    assert provider.calls == ["a", "b", "c", "d", "zzz"]  # each distinct query once
    provider.set("a", 0.1)
    assert provider.query_many(["a"])["a"].value == 0.1
    provider.healthy = False
    assert provider.query_many(["a"])["a"].error is not None
    assert not provider.check_health().ok


def test_static_provider_default() -> None:
    provider = StaticSignalProvider(default=None, clock=lambda: T0)
    assert provider.query_many(["x"])["x"] == QueryResult(None, None, T0)


def test_prometheus_provider_configuration() -> None:
    with PrometheusProvider(
        "https://prom.example:9090/",
        token="s3cret",
        ca_file="/etc/ssl/certs/ca-certificates.crt",
        timeout=2.5,
    ) as provider:
        assert provider.url == "https://prom.example:9090"
        client = provider._client
        assert client.headers == {"Authorization": "Bearer s3cret"}
        # Pinned per request by an adapter: REQUESTS_CA_BUNDLE cannot override it.
        adapter = client._session.get_adapter("https://prom.example:9090")
        assert isinstance(adapter, PinnedCA)
        assert adapter.ca_file == "/etc/ssl/certs/ca-certificates.crt"
        assert client._timeout == 2.5
        assert "s3cret" not in repr(provider)
    with PrometheusProvider("http://127.0.0.1:1", basic_auth=("u", "p")) as provider:
        assert provider._client.auth == ("u", "p")
        assert provider._client.headers is None
    with pytest.raises(ValueError):
        PrometheusProvider("prom:9090")


def test_prometheus_provider_unreachable_is_an_error_result() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    session = requests.Session()
    with PrometheusProvider(f"http://127.0.0.1:{port}", timeout=1.0, session=session) as p:
        results = p.query_many(["up", "vector(1)", "up"])
        assert set(results) == {"up", "vector(1)"}
        assert all(r.error and r.error.startswith("unreachable") for r in results.values())
        assert not p.check_health().ok
