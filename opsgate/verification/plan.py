"""The verification plan as an approver and the policy see it: what differs from the
action type's default, and which of those differences make it weaker.

Pure functions over the models. Weaker means easier to pass or slower to catch harm:
a signal or stop condition removed or changed (a changed query cannot be judged, so
it counts as weaker), a shorter hold, a longer timeout, interval or initial delay,
higher failure or error limits, a wider pass range or a narrower halt range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opsgate.models import Signal, StopCondition, VerificationSpec

__all__ = ["Difference", "verification_differences", "verification_document"]


@dataclass(frozen=True)
class Difference:
    code: str  # e.g. hold_shorter, signal_removed, failure_limit_higher
    message: str
    weakens: bool

    def as_input(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "weakens": self.weakens}


def _range_doc(r: Any) -> dict[str, float]:
    return r.model_dump(exclude_none=True)


def _signal_doc(signal: Signal) -> dict[str, Any]:
    return {
        "name": signal.name,
        "query": signal.query,
        "pass": _range_doc(signal.pass_),
        "worse_when": signal.worse_when,
    }


def _stop_doc(stop: StopCondition) -> dict[str, Any]:
    return {
        "name": stop.name,
        "query": stop.query,
        "halt": _range_doc(stop.halt),
        "worse_when": stop.worse_when,
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
        "signals": [_signal_doc(s) for s in spec.signals],
        "stop_conditions": [_stop_doc(c) for c in spec.stop_conditions],
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


def _range_weaker(before: Any, after: Any, *, widening_weakens: bool) -> bool:
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


def verification_differences(
    default: VerificationSpec, proposed: VerificationSpec
) -> list[Difference]:
    """Every difference of `proposed` from the action type's `default`, in a stable
    order; empty when they are the same."""
    if default == proposed:
        return []
    out = _numbers(default, proposed)
    before_signals = {s.name: s for s in default.signals}
    after_signals = {s.name: s for s in proposed.signals}
    for name, signal in before_signals.items():
        other = after_signals.get(name)
        if other is None:
            out.append(Difference("signal_removed", f"signal {name} removed", True))
        elif other.query != signal.query or other.worse_when != signal.worse_when:
            out.append(Difference("signal_changed", f"signal {name}: query changed", True))
        elif other.pass_ != signal.pass_:
            weaker = _range_weaker(signal.pass_, other.pass_, widening_weakens=True)
            out.append(
                Difference(
                    "signal_range_wider" if weaker else "signal_range_narrower",
                    f"signal {name}: pass range changed",
                    weaker,
                )
            )
    for name in after_signals.keys() - before_signals.keys():
        out.append(Difference("signal_added", f"signal {name} added", False))
    before_stops = {c.name: c for c in default.stop_conditions}
    after_stops = {c.name: c for c in proposed.stop_conditions}
    for name, stop in before_stops.items():
        other_stop = after_stops.get(name)
        if other_stop is None:
            out.append(Difference("stop_condition_removed", f"stop condition {name} removed", True))
        elif other_stop.query != stop.query or other_stop.worse_when != stop.worse_when:
            out.append(
                Difference("stop_condition_changed", f"stop condition {name}: query changed", True)
            )
        elif other_stop.halt != stop.halt:
            weaker = _range_weaker(stop.halt, other_stop.halt, widening_weakens=False)
            out.append(
                Difference(
                    "halt_range_narrower" if weaker else "halt_range_wider",
                    f"stop condition {name}: halt range changed",
                    weaker,
                )
            )
    for name in after_stops.keys() - before_stops.keys():
        out.append(Difference("stop_condition_added", f"stop condition {name} added", False))
    return out
