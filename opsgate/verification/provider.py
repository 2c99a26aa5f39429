"""The signal provider protocol: run PromQL instant queries, get one number each.

A provider never raises for a query: whatever goes wrong becomes a `QueryResult` with
`error` set, so the evaluator can count it against `error_limit`.

Result semantics (shared by every provider):

- one series / a scalar with a finite or infinite value -> `value`, no error;
- an empty vector -> `value=None`, no error: inconclusive (no data, no evidence);
- NaN (e.g. 0/0 when a service has no traffic) -> `value=None`, no error: inconclusive;
- several series -> error "query returned N series; a signal must return one". We fail
  closed instead of aggregating: picking or summing series would silently change what
  the signal means; the catalog author must aggregate (`sum(...)`, `max(...)`);
- a range vector, a string result, an unreachable provider, an HTTP error, an invalid
  query -> error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "PROMETHEUS_DEFAULT_SCRAPE_INTERVAL",
    "ProviderHealth",
    "QueryResult",
    "SignalProvider",
    "result_from_samples",
]


# Prometheus's own default `global.scrape_interval`: the floor's scrape term when the
# provider cannot say and nothing is configured.
PROMETHEUS_DEFAULT_SCRAPE_INTERVAL = 60.0


@dataclass(frozen=True)
class QueryResult:
    """One instant query's outcome: a value, nothing (None), or an error."""

    value: float | None
    error: str | None
    at: datetime

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def of(cls, value: float | None, at: datetime) -> QueryResult:
        """A successful result; NaN becomes None (inconclusive)."""
        if value is not None:
            value = float(value)
            if math.isnan(value):
                value = None
        return cls(value=value, error=None, at=at)

    @classmethod
    def failed(cls, error: str, at: datetime) -> QueryResult:
        return cls(value=None, error=error or "unknown error", at=at)


@dataclass(frozen=True)
class ProviderHealth:
    ok: bool
    detail: str


@runtime_checkable
class SignalProvider(Protocol):
    """Runs PromQL instant queries; never raises for a query."""

    def query_many(self, queries: Sequence[str]) -> dict[str, QueryResult]:
        """One result per distinct query, keyed by the query text."""
        ...

    def check_health(self) -> ProviderHealth: ...

    def scrape_interval(self) -> float | None:
        """The longest interval at which the data behind the queries is collected, in
        seconds (one of the terms of the post-change evidence floor); None if unknown."""
        ...


def _parse_sample(raw: Any) -> float:
    """A Prometheus sample value: a string such as "0.25", "NaN", "+Inf"."""
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ValueError(f"unexpected sample value {raw!r}")
    return float(raw)


def result_from_samples(data: Any, at: datetime) -> QueryResult:
    """Interpret the `data.result` of a Prometheus instant query (see module doc)."""
    try:
        if isinstance(data, list) and len(data) == 2 and not isinstance(data[0], dict):
            # A scalar (or string) result: [<unix time>, "<value>"].
            return QueryResult.of(_parse_sample(data[1]), at)
        if not isinstance(data, list):
            return QueryResult.failed(f"unexpected query result {type(data).__name__}", at)
        if not data:
            return QueryResult.of(None, at)
        if len(data) > 1:
            return QueryResult.failed(
                f"query returned {len(data)} series; a signal must return one", at
            )
        series = data[0]
        if not isinstance(series, dict):
            return QueryResult.failed("unexpected query result format", at)
        if "value" not in series:
            if "values" in series:
                return QueryResult.failed(
                    "query returned a range vector; a signal must return an instant value", at
                )
            return QueryResult.failed("unexpected query result format", at)
        sample = series["value"]
        if not isinstance(sample, list | tuple) or len(sample) != 2:
            return QueryResult.failed("unexpected sample format", at)
        return QueryResult.of(_parse_sample(sample[1]), at)
    except (ValueError, TypeError) as exc:
        return QueryResult.failed(f"cannot read query result: {exc}", at)
