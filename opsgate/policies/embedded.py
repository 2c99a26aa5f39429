"""The embedded engine: regopy (rego-cpp), strict errors, every evaluation under a deadline.

The bundle is compiled here once (to report errors and refuse it early) and evaluated in
worker processes (`opsgate.policies.sandbox`) that are killed when an evaluation
outlives its deadline: regopy cannot be interrupted, and some built-ins never return.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opsgate.policies.engine import (
    APPROVAL_RULE,
    AUTHZ_RULE,
    DECISION_RULE,
    UNAVAILABLE,
    PolicyResult,
    bundle_files,
    bundle_revision,
    interpret,
    load_bundle_data,
    unavailable,
)
from opsgate.policies.fidelity import opa_compile_error, scan
from opsgate.policies.sandbox import (
    DEFAULT_MAX_MEMORY_BYTES,
    EVALUATORS,
    LoadError,
    Payload,
    SandboxError,
    WorkerPool,
)
from opsgate.shared import FileSignature, files_signature

# How often the bundle's files are checked for changes (stat only).
RELOAD_CHECK_SECONDS = 1.0
# The time budget of one decision, and how many evaluations may run at once.
DEFAULT_TIMEOUT_SECONDS = 0.5
DEFAULT_WORKERS = 2


@dataclass(frozen=True)
class _Compiled:
    revision: str
    signature: FileSignature
    error: str | None = None
    payload: Payload | None = None


class EmbeddedEngine:
    """Evaluates a policy bundle directory with regopy.

    Evaluations run in a pool of worker processes (one evaluation per worker at a time),
    each under `timeout` seconds and `max_memory` bytes resident; past either the
    decision denies with policy_engine_unavailable and the worker is killed and replaced.
    """

    name = "embedded"
    evaluator = "regopy"

    def __init__(
        self,
        directory: Path,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        workers: int = DEFAULT_WORKERS,
        max_memory: int | None = DEFAULT_MAX_MEMORY_BYTES,
    ) -> None:
        self.directory = directory
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self._pool = WorkerPool(size=workers, timeout=self.timeout, max_memory=max_memory)
        # An engine dropped without close() still ends its worker processes.
        self._finalizer = weakref.finalize(self, self._pool.close)
        self.evaluations = 0
        self.failures = 0
        self.last_error: str | None = None
        self._compiled = self._compile()
        self._checked_at = time.monotonic()

    @property
    def timeouts(self) -> int:
        """Evaluations abandoned at the deadline (their worker was killed)."""
        return self._pool.timeouts

    def close(self) -> None:
        """End the worker processes; an evaluation after this denies."""
        self._finalizer()

    def __enter__(self) -> EmbeddedEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _compile(self) -> _Compiled:
        try:
            # The revision must name exactly the bytes the workers compile: read twice.
            for _ in range(3):
                signature = files_signature(bundle_files(self.directory))
                revision = bundle_revision(self.directory)
                data = load_bundle_data(self.directory)
                modules = tuple(
                    (path.relative_to(self.directory).as_posix(), path.read_text("utf-8"))
                    for path in bundle_files(self.directory)
                    if path.suffix == ".rego"
                )
                if bundle_revision(self.directory) == revision:
                    break
            else:
                raise ValueError("the bundle kept changing while it was read")
            payload = Payload(
                revision, modules, data, (DECISION_RULE, APPROVAL_RULE, AUTHZ_RULE), self.evaluator
            )
            self._validate(payload)
            return _Compiled(revision, signature, payload=payload)
        except (OSError, ValueError, LoadError) as exc:
            return _Compiled("", (), error=f"cannot compile {self.directory}: {exc}")

    def _validate(self, payload: Payload) -> None:
        """Refuse what regopy answers unlike OPA; compile here once, so a broken bundle is
        reported before any decision."""
        refusals = scan(payload.modules)
        if refusals:
            raise LoadError("; ".join(str(r) for r in refusals))
        EVALUATORS[self.evaluator](payload.message())
        # What OPA would not even compile must not be evaluated by a laxer compiler.
        rejected = opa_compile_error(payload.modules)
        if rejected is not None:
            raise LoadError(rejected)

    def _current(self) -> _Compiled:
        now = time.monotonic()
        if now - self._checked_at >= RELOAD_CHECK_SECONDS:
            with self._lock:
                if now - self._checked_at >= RELOAD_CHECK_SECONDS:
                    self._checked_at = now
                    try:
                        current = files_signature(bundle_files(self.directory))
                        changed = current != self._compiled.signature
                    except OSError:
                        changed = True
                    if changed:
                        self._compiled = self._compile()
        return self._compiled

    def reload(self) -> None:
        with self._lock:
            self._compiled = self._compile()
            self._checked_at = time.monotonic()

    def revision(self) -> str:
        return self._current().revision

    def evaluate(self, rule: str, input: Mapping[str, Any]) -> PolicyResult:
        result = self._evaluate(rule, input)
        self._count(result)
        return result

    def _count(self, result: PolicyResult) -> None:
        with self._counter_lock:
            self.evaluations += 1
            if UNAVAILABLE in result.deny_codes:
                self.failures += 1
                self.last_error = result.error

    def evaluate_warm(self, rule: str, input: Mapping[str, Any]) -> PolicyResult | None:
        """The verdict within `timeout`, or None when that cannot be promised: no idle
        worker has the current bundle loaded (a worker would have to start and compile
        it), or the bundle is due its reload check (which may recompile here). The
        caller then evaluates as usual, under its own deadline."""
        compiled = self._compiled
        if compiled.payload is None or time.monotonic() - self._checked_at >= RELOAD_CHECK_SECONDS:
            return None
        try:
            answer = self._pool.evaluate_warm(compiled.payload, rule, input)
        except SandboxError as exc:
            result = unavailable(str(exc), compiled.revision)
        except (TypeError, ValueError) as exc:  # an input that is not JSON
            result = unavailable(f"{type(exc).__name__}: {exc}", compiled.revision)
        else:
            if answer is None:
                return None
            result = self._result(answer, compiled.revision)
        self._count(result)
        return result

    def _evaluate(self, rule: str, input: Mapping[str, Any]) -> PolicyResult:
        compiled = self._current()
        if compiled.error is not None or compiled.payload is None:
            return unavailable(compiled.error or "no compiled bundle")
        try:
            answer = self._pool.evaluate(compiled.payload, rule, input)
        except SandboxError as exc:
            return unavailable(str(exc), compiled.revision)
        except (TypeError, ValueError) as exc:  # an input that is not JSON
            return unavailable(f"{type(exc).__name__}: {exc}", compiled.revision)
        return self._result(answer, compiled.revision)

    @staticmethod
    def _result(answer: Mapping[str, Any], revision: str) -> PolicyResult:
        if answer.get("ok") is not True:
            return unavailable(str(answer.get("error") or "no answer"), revision)
        return interpret(answer.get("value"), revision)

    def describe(self) -> dict[str, Any]:
        """What doctor prints: the deadline and the counters."""
        return {
            "engine": self.name,
            "timeout": self.timeout,
            "workers": self._pool.size,
            "max_memory_mib": None
            if self._pool.max_memory is None
            else self._pool.max_memory >> 20,
            "evaluations": self.evaluations,
            "failures": self.failures,
            "timeouts": self._pool.timeouts,
            "worker_crashes": self._pool.crashes,
            "worker_restarts": self._pool.restarts,
            "last_error": self.last_error,
        }


class OpaEmbeddedEngine(EmbeddedEngine):
    """The same isolation and deadline, evaluating with OPA's own Go evaluator.

    opa-golib-python-bindings embeds `github.com/open-policy-agent/opa/v1/rego`: the
    decisions are OPA's, without an OPA server to run.
    """

    name = "opa-embedded"
    evaluator = "opa"

    def _validate(self, payload: Payload) -> None:
        # OPA's own evaluator: nothing to refuse, only compile errors to report.
        EVALUATORS[self.evaluator](payload.message())
