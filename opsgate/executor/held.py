"""What a worker holds while it runs actions, shared by the worker shell, the per-action
flow and recovery: the held actions, the step pool, and the events a live view shows."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from opsgate.models import Action, ActionState, ActionType
from opsgate.proposals import step_values
from opsgate.shared import one_line as shared_one_line
from opsgate.verification.hub import Watch
from opsgate.verification.promql import render_queries

log = logging.getLogger(__name__)

MAX_REASON = 2000


def one_line(text: str | None, limit: int = MAX_REASON) -> str:
    """A reason as stored: one line, at most MAX_REASON characters."""
    return shared_one_line(text or "", limit)


def secret_values(action_type: ActionType, params: Mapping[str, Any]) -> list[str]:
    return [
        str(params[name])
        for name, spec in action_type.params.items()
        if spec.secret and params.get(name) not in (None, "")
    ]


@dataclass(frozen=True)
class ExecutorEvent:
    """Something a live view or the worker log may show."""

    kind: str  # claimed | blocked | step | measured | state | finished
    action_id: str
    message: str = ""
    watch: Watch | None = None
    state: ActionState | None = None


Emit = Callable[..., None]  # (kind, action_id, message="", **ExecutorEvent fields)


@dataclass
class HeldAction:
    """What this worker holds for one action while it runs."""

    action: Action
    action_type: ActionType
    values: dict[str, Any]
    secrets: list[str]
    rendered: dict[str, str]
    cancel: threading.Event = field(default_factory=threading.Event)
    watch: Watch | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    baseline: dict[str, float | None] = field(default_factory=dict)
    final_state: ActionState | None = None

    @classmethod
    def of(
        cls,
        action: Action,
        action_type: ActionType,
        captured: Mapping[str, Any] | None = None,
        baseline: Mapping[str, float | None] | None = None,
    ) -> HeldAction:
        """Step values, secrets and rendered queries of `action` under `action_type`;
        ValueError if a query cannot be rendered."""
        values = step_values(action, captured or {})
        return cls(
            action=action,
            action_type=action_type,
            values=values,
            secrets=secret_values(action_type, action.params),
            rendered=render_queries(action.verification, values),
            baseline=dict(baseline or {}),
        )


class Holdings:
    """The actions this worker holds, the step pool that works on them, and whether the
    worker is draining. Shared by threads: the pool, the hub's and the heartbeat."""

    def __init__(self, concurrency: int, emit: Emit) -> None:
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="opsgate-step")
        self._held: dict[str, HeldAction] = {}
        self._lock = threading.Lock()
        self._emit = emit
        self.draining = False

    def add(self, held: HeldAction) -> None:
        with self._lock:
            self._held[held.action.id] = held

    def get(self, action_id: str) -> HeldAction | None:
        with self._lock:
            return self._held.get(action_id)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def pending(self) -> list[threading.Event]:
        with self._lock:
            return [held.finished for held in self._held.values()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def submit(self, work: Callable[..., None], *args: Any) -> None:
        self._pool.submit(work, *args)

    def release(self, held: HeldAction, state: ActionState | None) -> None:
        """Let go of `held`: finished in `state`, or None when handed over or abandoned."""
        held.final_state = state
        with self._lock:
            self._held.pop(held.action.id, None)
        held.finished.set()
        self._emit("finished", held.action.id, state.value if state else "released", state=state)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
