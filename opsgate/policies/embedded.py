"""The embedded engine: regopy (rego-cpp) in process, compiled once, strict errors."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regopy

from opsgate.policies.engine import (
    APPROVAL_RULE,
    AUTHZ_RULE,
    DECISION_RULE,
    PolicyResult,
    bundle_files,
    bundle_revision,
    interpret,
    load_bundle_data,
    unavailable,
)

# How often the bundle's files are checked for changes (stat only).
RELOAD_CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class _Compiled:
    bundle: Any
    revision: str
    signature: tuple[tuple[str, int, int], ...]
    error: str | None = None


def _new_interpreter() -> Any:
    interp = regopy.Interpreter()
    interp.strict_built_in_errors = True
    # rego-cpp prints compile errors to stdout otherwise, which would corrupt --json output.
    interp.log_level = regopy.LogLevel.NONE
    return interp


def _signature(directory: Path) -> tuple[tuple[str, int, int], ...]:
    out = []
    for path in bundle_files(directory):
        stat = path.stat()
        out.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(out)


class EmbeddedEngine:
    """Evaluates a policy bundle directory with regopy.

    The compiled bundle is shared; each thread has its own interpreter, because
    `set_input` + `query_bundle` on one interpreter is not a thread-safe pair.
    """

    name = "embedded"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._local = threading.local()
        self._compiled = self._compile()
        self._checked_at = time.monotonic()

    def _compile(self) -> _Compiled:
        try:
            signature = _signature(self.directory)
            revision = bundle_revision(self.directory)
            interp = _new_interpreter()
            interp.add_data(load_bundle_data(self.directory))
            for path in bundle_files(self.directory):
                if path.suffix == ".rego":
                    name = path.relative_to(self.directory).as_posix()
                    interp.add_module(name, path.read_text(encoding="utf-8"))
            bundle = interp.build(None, [DECISION_RULE, APPROVAL_RULE, AUTHZ_RULE])
            return _Compiled(bundle, revision, signature)
        except (OSError, ValueError, regopy.RegoError, RuntimeError) as exc:
            return _Compiled(None, "", (), error=f"cannot compile {self.directory}: {exc}")

    def _current(self) -> _Compiled:
        now = time.monotonic()
        if now - self._checked_at >= RELOAD_CHECK_SECONDS:
            with self._lock:
                if now - self._checked_at >= RELOAD_CHECK_SECONDS:
                    self._checked_at = now
                    try:
                        changed = _signature(self.directory) != self._compiled.signature
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

    def _interpreter(self) -> Any:
        interp = getattr(self._local, "interp", None)
        if interp is None:
            interp = _new_interpreter()
            self._local.interp = interp
        return interp

    def evaluate(self, rule: str, input: Mapping[str, Any]) -> PolicyResult:
        compiled = self._current()
        if compiled.error is not None or compiled.bundle is None:
            return unavailable(compiled.error or "no compiled bundle")
        try:
            interp = self._interpreter()
            interp.set_input(dict(input))
            output = interp.query_bundle_entrypoint(compiled.bundle, rule)
            # Reading an errored output aborts the process in regopy 1.5.2: check ok() first.
            if not output.ok():
                return unavailable(f"evaluation error in {rule}", compiled.revision)
            text = str(output)
        except (regopy.RegoError, RuntimeError, ValueError, TypeError) as exc:
            return unavailable(f"{type(exc).__name__}: {exc}", compiled.revision)
        return interpret(_first_expression(text), compiled.revision)


def _first_expression(text: str) -> Any:
    if text.strip() == "undefined":
        return None
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return None
    expressions = document.get("expressions") if isinstance(document, dict) else None
    if not isinstance(expressions, list) or len(expressions) != 1:
        return None
    return expressions[0]
