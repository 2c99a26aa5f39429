"""Runs approved actions: `Executor` (the worker) and `ExecutorEvent` (what it reports).

Loaded on first use, so importing `opsgate.executor.runners` or `.plan` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opsgate.executor.executor import Executor, ExecutorEvent

__all__ = ["Executor", "ExecutorEvent"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from opsgate.executor import executor

        return getattr(executor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
