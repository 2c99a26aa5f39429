"""The verification plan as an approver and the policy see it: what differs from the
action type's default, and which of those differences make it weaker.

Pure functions over the models. Weaker means easier to pass or slower to catch harm:
a signal or stop condition removed or changed (a changed query cannot be judged, so
it counts as weaker), a shorter hold, a longer timeout, interval or initial delay,
higher failure or error limits, a wider pass range or a narrower halt range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from opsgate.models import Range, Signal, StopCondition, VerificationSpec

__all__ = ["Difference", "verification_differences", "verification_document"]


@dataclass(frozen=True)
class Difference:
    code: str  # e.g. hold_shorter, signal_removed, failure_limit_higher
    message: str
    weakens: bool

    def as_input(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "weakens": self.weakens}


def _range_doc(r: Range) -> dict[str, float]:
    return r.model_dump(exclude_none=True)


def _bounds(check: Signal | StopCondition) -> tuple[str, Range]:
    """A signal passes inside its range, a stop condition halts inside its own."""
    if isinstance(check, Signal):
        return "pass", check.pass_
    return "halt", check.halt


def _check_doc(check: Signal | StopCondition) -> dict[str, Any]:
    key, bounds = _bounds(check)
    return {
        "name": check.name,
        "query": check.query,
        key: _range_doc(bounds),
        "worse_when": check.worse_when,
    }


def verification_document(spec: VerificationSpec) -> dict[str, Any]:
    """The whole verification as plain JSON (policy input, `show --json`, MCP)."""
    return {
        "interval": spec.interval,
        "initial_delay": spec.initial_delay,
        "hold": spec.hold,
        "timeout": spec.timeout,
        "failure_limit": spec.failure_limit,
        "error_limit": spec.error_limit,
        "signals": [_check_doc(s) for s in spec.signals],
        "stop_conditions": [_check_doc(c) for c in spec.stop_conditions],
    }


def _numbers(default: VerificationSpec, proposed: VerificationSpec) -> list[Difference]:
    out: list[Difference] = []
    # (field, the direction that weakens: +1 larger is weaker, -1 smaller is weaker)
    for name, weaker_when in (
        ("hold", -1),
        ("timeout", +1),
        ("interval", +1),
        ("initial_delay", +1),
        ("failure_limit", +1),
        ("error_limit", +1),
    ):
        before, after = getattr(default, name), getattr(proposed, name)
        if before == after:
            continue
        weakens = (after - before) * weaker_when > 0
        direction = "longer" if after > before else "shorter"
        if name.endswith("limit"):
            direction = "higher" if after > before else "lower"
        out.append(
            Difference(
                f"{name}_{direction}",
                f"{name} {after:g} instead of {before:g}",
                weakens,
            )
        )
    return out


def _range_weaker(before: Range, after: Range, *, widening_weakens: bool) -> bool:
    """Whether `after` accepts something `before` did not (pass), or catches less (halt)."""
    if before == after:
        return False
    lower_b = before.min if before.min is not None else float("-inf")
    upper_b = before.max if before.max is not None else float("inf")
    lower_a = after.min if after.min is not None else float("-inf")
    upper_a = after.max if after.max is not None else float("inf")
    wider = lower_a < lower_b or upper_a > upper_b
    narrower = lower_a > lower_b or upper_a < upper_b
    relative_changed = (before.baseline_plus, before.baseline_times) != (
        after.baseline_plus,
        after.baseline_times,
    )
    if relative_changed:
        return True  # a relative bound moved: cannot be judged either way, so weaker
    return wider if widening_weakens else narrower


def _check_differences(
    code: str,
    range_code: str,
    default: Sequence[Signal | StopCondition],
    proposed: Sequence[Signal | StopCondition],
    *,
    widening_weakens: bool,
) -> list[Difference]:
    """The differences of one list of checks; `code` names them (signal, stop_condition)."""
    label = code.replace("_", " ")
    out: list[Difference] = []
    after = {c.name: c for c in proposed}
    for check in default:
        name = check.name
        other = after.get(name)
        if other is None:
            out.append(Difference(f"{code}_removed", f"{label} {name} removed", True))
            continue
        if other.query != check.query or other.worse_when != check.worse_when:
            out.append(Difference(f"{code}_changed", f"{label} {name}: query changed", True))
            continue
        range_key, before_range = _bounds(check)
        _, after_range = _bounds(other)
        if after_range != before_range:
            weaker = _range_weaker(before_range, after_range, widening_weakens=widening_weakens)
            wider = weaker == widening_weakens  # weaker is wider for a pass range only
            out.append(
                Difference(
                    f"{range_code}_{'wider' if wider else 'narrower'}",
                    f"{label} {name}: {range_key} range changed",
                    weaker,
                )
            )
    before_names = {c.name for c in default}
    for check in proposed:
        if check.name not in before_names:
            out.append(Difference(f"{code}_added", f"{label} {check.name} added", False))
    return out


def verification_differences(
    default: VerificationSpec, proposed: VerificationSpec
) -> list[Difference]:
    """Every difference of `proposed` from the action type's `default`, in a stable
    order; empty when they are the same."""
    if default == proposed:
        return []
    return (
        _numbers(default, proposed)
        # A wider pass range lets more through; a wider halt range catches more.
        + _check_differences(
            "signal", "signal_range", default.signals, proposed.signals, widening_weakens=True
        )
        + _check_differences(
            "stop_condition",
            "halt_range",
            default.stop_conditions,
            proposed.stop_conditions,
            widening_weakens=False,
        )
    )
