"""Named live checks evaluated before a decision and handed to policy as `preconditions`.

A check never raises: an error makes it `ok: false` with the error, so a required
precondition that cannot be evaluated denies (fail closed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from opsgate.models import ActionType, VerificationSpec
from opsgate.verification.promql import render_query


@dataclass(frozen=True)
class PreconditionResult:
    name: str
    ok: bool
    value: Any = None
    required: bool = False
    error: str | None = None

    def as_input(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "ok": self.ok,
            "value": self.value,
            "required": self.required,
        }
        if self.error:
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class CheckContext:
    """What a check may look at: the proposal and the facts gathered for it."""

    action_type: ActionType
    target: str
    environment: str
    params: Mapping[str, Any]
    now: datetime
    active_on_target: int
    freeze_windows: Sequence[Mapping[str, Any]]
    verification: VerificationSpec | None = None
    phase: str = "propose"


Check = Callable[[CheckContext], PreconditionResult]


def concurrent_action(ctx: CheckContext) -> PreconditionResult:
    """No other action holds the same target in the same environment."""
    return PreconditionResult(
        "concurrent_action", ok=ctx.active_on_target == 0, value=ctx.active_on_target
    )


def change_freeze(ctx: CheckContext) -> PreconditionResult:
    """The environment is not inside a change-freeze window from the bundle's data."""
    for window in ctx.freeze_windows:
        try:
            envs = window.get("environments") or []
            start = datetime.fromisoformat(str(window["start"]))
            end = datetime.fromisoformat(str(window["end"]))
            if ("*" in envs or ctx.environment in envs) and start <= ctx.now < end:
                return PreconditionResult("change_freeze", ok=False, value=window.get("name"))
        except (KeyError, ValueError, TypeError) as exc:
            return PreconditionResult("change_freeze", ok=False, error=f"bad freeze window: {exc}")
    return PreconditionResult("change_freeze", ok=True, value=None)


# Always evaluated, for every proposal.
BUILTIN_CHECKS: dict[str, Check] = {
    "concurrent_action": concurrent_action,
    "change_freeze": change_freeze,
}


_NONE = object()  # never a registered check: an unknown name is not offline


class PreconditionRegistry:
    """Named checks; action types name the ones they require in `preconditions:`."""

    def __init__(self, extra: Mapping[str, Check] | None = None) -> None:
        self._checks: dict[str, Check] = dict(BUILTIN_CHECKS)
        self._checks.update(extra or {})

    def register(self, name: str, check: Callable[[CheckContext], PreconditionResult]) -> None:
        self._checks[name] = check

    def offline(self, ctx: CheckContext) -> bool:
        """Whether every check `evaluate` would run for `ctx` is a built-in one: no I/O,
        nothing that can hang, so it needs no thread and no deadline (`timed_out` runs
        the same ones in the caller's thread)."""
        names = set(BUILTIN_CHECKS) | set(ctx.action_type.preconditions)
        return all(self._checks.get(name) is BUILTIN_CHECKS.get(name, _NONE) for name in names)

    def timed_out(self, ctx: CheckContext, seconds: float) -> list[PreconditionResult]:
        """What to decide on when the checks did not answer in time: the built-in ones
        (no I/O) evaluated again here, every other one failed as unanswered."""
        required = set(ctx.action_type.preconditions)
        results: list[PreconditionResult] = []
        for name in sorted(set(BUILTIN_CHECKS) | required):
            if name in BUILTIN_CHECKS and self._checks.get(name) is BUILTIN_CHECKS[name]:
                try:
                    result = BUILTIN_CHECKS[name](ctx)
                except Exception as exc:  # as in evaluate: a broken check denies
                    result = PreconditionResult(name, ok=False, error=f"{exc}")
            else:
                result = PreconditionResult(name, ok=False, error=f"no answer within {seconds:g}s")
            results.append(
                PreconditionResult(
                    result.name, result.ok, result.value, name in required, result.error
                )
            )
        return results

    def evaluate(self, ctx: CheckContext) -> list[PreconditionResult]:
        results: list[PreconditionResult] = []
        required = set(ctx.action_type.preconditions)
        for name in sorted(set(BUILTIN_CHECKS) | required):
            check = self._checks.get(name)
            if check is None:
                results.append(
                    PreconditionResult(
                        name, ok=False, required=True, error="no such precondition is configured"
                    )
                )
                continue
            try:
                result = check(ctx)
            except Exception as exc:  # a check that breaks must deny, not crash the decision
                result = PreconditionResult(name, ok=False, error=f"{type(exc).__name__}: {exc}")
            results.append(
                PreconditionResult(
                    result.name, result.ok, result.value, name in required, result.error
                )
            )
        return results


def signal_out_of_range(name: str, signal_name: str, provider: Any) -> Check:
    """A live PromQL check: ok while the action type's `signal_name` signal reads
    outside its pass range right now (e.g. `error_rate_elevated`: the error rate this
    action should fix is in fact elevated). No data or an error is not ok."""

    def check(ctx: CheckContext) -> PreconditionResult:
        spec = ctx.verification or ctx.action_type.verification
        signal = next((s for s in spec.signals if s.name == signal_name), None)
        if signal is None:
            return PreconditionResult(
                name, ok=False, error=f"the verification has no signal named {signal_name}"
            )
        if not signal.pass_.absolute:
            # "Outside a range relative to a baseline" has no meaning before there is one.
            return PreconditionResult(
                name,
                ok=False,
                error=f"signal {signal_name} has no absolute pass bound to be elevated against",
            )
        values = {k: v for k, v in ctx.params.items() if isinstance(v, str | int | float | bool)}
        values.update(target=ctx.target, environment=ctx.environment)
        query = render_query(signal.query, values)
        result = provider.query_many([query])[query]
        if result.error is not None:
            return PreconditionResult(name, ok=False, error=f"query failed: {result.error}")
        if result.value is None:
            return PreconditionResult(name, ok=False, error="the query returned no data")
        return PreconditionResult(
            name, ok=not signal.pass_.contains(result.value), value=result.value
        )

    return check


def unavailable(name: str, why: str) -> Check:
    """A check that cannot run in this configuration: never ok (fail closed)."""

    def check(ctx: CheckContext) -> PreconditionResult:
        return PreconditionResult(name, ok=False, error=why)

    return check


def prometheus_checks(provider: Any | None) -> dict[str, Check]:
    """The Prometheus-backed checks action types may require by name."""
    if provider is None:
        why = "OPSGATE_PROMETHEUS_URL is not set, so this live check cannot run"
        return {"error_rate_elevated": unavailable("error_rate_elevated", why)}
    return {
        "error_rate_elevated": signal_out_of_range("error_rate_elevated", "error_rate", provider)
    }
