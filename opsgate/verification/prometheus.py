"""A `SignalProvider` backed by the Prometheus HTTP API (via prometheus-api-client)."""

from __future__ import annotations

import ast
import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import requests
import yaml
from prometheus_api_client.exceptions import PrometheusApiClientException
from prometheus_api_client.prometheus_connect import PrometheusConnect
from urllib3.util.retry import Retry

from opsgate.shared import utcnow
from opsgate.tls import pin_ca
from opsgate.verification.lookback import parse_promql_duration
from opsgate.verification.provider import (
    PROMETHEUS_DEFAULT_SCRAPE_INTERVAL,
    ProviderHealth,
    QueryResult,
    result_from_samples,
)

__all__ = ["PROMETHEUS_DEFAULT_SCRAPE_INTERVAL", "PrometheusProvider", "scrape_interval_of"]

_MAX_ERROR_LENGTH = 500
_SCRAPE_INTERVAL_TTL = 60.0
_HTTP_ERROR = re.compile(r"^HTTP Status Code (\d+) \((b(?:'.*'|\".*\"))\)$", re.DOTALL)


def _describe_api_error(exc: PrometheusApiClientException) -> str:
    """`HTTP 400: <Prometheus's own error message>` from the client's exception text."""
    text = str(exc)
    match = _HTTP_ERROR.match(text)
    if match:
        status = match.group(1)
        try:
            body = ast.literal_eval(match.group(2))
            payload = json.loads(body)
            message = payload.get("error") if isinstance(payload, dict) else None
            if message:
                return f"HTTP {status}: {message}"
            return f"HTTP {status}: {body.decode('utf-8', 'replace')}"
        except (ValueError, SyntaxError, AttributeError, UnicodeDecodeError):
            return f"HTTP {status}"
    return text


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PrometheusApiClientException):
        text = _describe_api_error(exc)
    elif isinstance(exc, requests.Timeout):
        text = f"timeout: {exc}"
    elif isinstance(exc, requests.ConnectionError):
        text = f"unreachable: {exc}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    if len(text) > _MAX_ERROR_LENGTH:
        text = text[: _MAX_ERROR_LENGTH - 1] + "…"
    return text


class PrometheusProvider:
    """Instant queries against one Prometheus (or a PromQL-compatible API).

    - `token`: sent as `Authorization: Bearer <token>`;
    - `basic_auth`: `(user, password)`;
    - `ca_file`: a CA bundle to verify the server's certificate (default: system CAs);
    - `timeout`: seconds per HTTP request (connect and read). No retries: the
      evaluator's `error_limit` is the retry policy, and a retry storm would only
      delay a rollback;
    - `session`: a custom `requests.Session` (proxies, client certificates); it is
      closed with the provider.

    `query_many` never raises: every exception becomes an error result. Each distinct
    query is sent once per call, at most `max_workers` at a time.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        basic_auth: tuple[str, str] | None = None,
        ca_file: str | None = None,
        timeout: float = 5.0,
        max_workers: int = 4,
        session: requests.Session | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("the Prometheus URL must start with http:// or https://")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self._auth_headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._basic_auth = basic_auth
        self._scrape_lock = threading.Lock()
        self._scrape_cache: tuple[float, float | None] | None = None  # (monotonic, value)
        self.max_workers = max_workers
        self._clock = clock
        self._session = session if session is not None else requests.Session()
        # The client annotates these without Optional (and timeout as int): pass as Any.
        options: dict[str, Any] = {
            "headers": {"Authorization": f"Bearer {token}"} if token else None,
            "auth": basic_auth,
            "timeout": self.timeout,
        }
        self._client = PrometheusConnect(
            url=self.url,
            session=self._session,
            retry=Retry(total=0, raise_on_status=False),
            **options,
        )
        if ca_file is not None:
            # After the client mounted its adapters: the CA file must win over them and
            # over REQUESTS_CA_BUNDLE.
            self._session.verify = ca_file
            pin_ca(self._session, ca_file, prefix=self.url)

    def __repr__(self) -> str:
        return f"PrometheusProvider({self.url!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> PrometheusProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(self, query: str) -> QueryResult:
        """One instant query; never raises."""
        try:
            data: Any = self._client.custom_query(query=query)
        except Exception as exc:  # every failure is an error result, by contract
            return QueryResult.failed(_describe(exc), self._clock())
        return result_from_samples(data, self._clock())

    def query_many(self, queries: Sequence[str]) -> dict[str, QueryResult]:
        distinct = list(dict.fromkeys(queries))
        if len(distinct) <= 1 or self.max_workers == 1:
            return {q: self.query(q) for q in distinct}
        workers = min(self.max_workers, len(distinct))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="opsgate-prom") as pool:
            results = list(pool.map(self.query, distinct))
        return dict(zip(distinct, results, strict=True))

    def scrape_interval(self) -> float | None:
        """The longest scrape interval in the server's configuration (`global` and every
        scrape job), from `/api/v1/status/config`; cached for a minute. None when the
        server does not say (a PromQL-compatible API without that endpoint, an error):
        the caller then uses its configured fallback. The longest, because opsgate cannot
        tell which job feeds a query, and a floor too short lets old samples count."""
        with self._scrape_lock:
            cached = self._scrape_cache
            if cached is not None and time.monotonic() - cached[0] < _SCRAPE_INTERVAL_TTL:
                return cached[1]
            value = self._fetch_scrape_interval()
            self._scrape_cache = (time.monotonic(), value)
            return value

    def _fetch_scrape_interval(self) -> float | None:
        try:
            response = self._session.get(
                f"{self.url}/api/v1/status/config",
                headers=self._auth_headers,
                auth=self._basic_auth,
                timeout=self.timeout,
            )
            if response.status_code != 200:
                return None
            payload = response.json()
            config = yaml.safe_load(payload["data"]["yaml"]) or {}
        except (requests.RequestException, ValueError, KeyError, TypeError, yaml.YAMLError):
            return None
        return scrape_interval_of(config)

    def check_health(self) -> ProviderHealth:
        """Runs `vector(1)`: proves reachability, credentials and a working query API."""
        result = self.query("vector(1)")
        if result.error is not None:
            return ProviderHealth(ok=False, detail=result.error)
        if result.value != 1.0:
            return ProviderHealth(ok=False, detail=f"vector(1) returned {result.value!r}")
        return ProviderHealth(ok=True, detail=f"{self.url} answers queries")


def scrape_interval_of(config: Any) -> float | None:
    """The longest scrape interval of a Prometheus configuration document (a job
    without its own interval scrapes at the global one); None if it is malformed."""
    if not isinstance(config, dict):
        return None
    try:
        global_section = config.get("global") or {}
        default = parse_promql_duration(str(global_section.get("scrape_interval", "1m")))
        intervals = [default]
        for job in config.get("scrape_configs") or []:
            if isinstance(job, dict) and "scrape_interval" in job:
                intervals.append(parse_promql_duration(str(job["scrape_interval"])))
    except (ValueError, AttributeError):
        return None
    return max(intervals)
