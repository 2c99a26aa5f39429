"""An in-memory `SignalProvider` for tests and dry runs: no Prometheus needed."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from opsgate.shared import utcnow
from opsgate.verification.provider import ProviderHealth, QueryResult

__all__ = ["StaticSignalProvider", "StaticValue"]

# What a query answers: a number, None (empty vector: inconclusive), or an exception
# (reported as an error result, the way a real provider reports an outage).
StaticValue = float | int | None | BaseException


class StaticSignalProvider:
    """Answers queries from a mutable dict `query -> value | None | exception`.

    An unknown query is an error (like an invalid query), unless `default` is given:
    pass `default=None` to make unknown queries inconclusive instead. `calls` records
    every query sent (one entry per distinct query per `query_many` call), and
    `healthy = False` makes every query and the health check fail.
    """

    _MISSING = object()

    def __init__(
        self,
        values: Mapping[str, StaticValue] | None = None,
        *,
        default: StaticValue | object = _MISSING,
        clock: Callable[[], datetime] = utcnow,
        scrape_interval: float | None = 0.0,
    ) -> None:
        self.values: dict[str, StaticValue] = dict(values or {})
        # Values set here are live at once: no scrape lag unless a test asks for one.
        self._scrape_interval = scrape_interval
        self.default = default
        self.healthy = True
        self.calls: list[str] = []
        self._clock = clock
        self._lock = threading.Lock()

    def set(self, query: str, value: StaticValue) -> None:
        with self._lock:
            self.values[query] = value

    def query(self, query: str) -> QueryResult:
        at = self._clock()
        with self._lock:
            self.calls.append(query)
            if not self.healthy:
                return QueryResult.failed("unreachable: static provider is down", at)
            if query in self.values:
                value = self.values[query]
            elif self.default is not self._MISSING:
                value = self.default  # type: ignore[assignment]
            else:
                return QueryResult.failed(f"no static value for query {query!r}", at)
        if isinstance(value, BaseException):
            return QueryResult.failed(f"{type(value).__name__}: {value}", at)
        return QueryResult.of(None if value is None else float(value), at)

    def query_many(self, queries: Sequence[str]) -> dict[str, QueryResult]:
        return {q: self.query(q) for q in dict.fromkeys(queries)}

    def scrape_interval(self) -> float | None:
        return self._scrape_interval

    def check_health(self) -> ProviderHealth:
        if self.healthy:
            return ProviderHealth(ok=True, detail="static provider")
        return ProviderHealth(ok=False, detail="static provider is down")
