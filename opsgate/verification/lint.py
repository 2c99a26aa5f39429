"""Verifications that cannot be met as written, found before anything runs.

Pure functions over the catalog's models; `opsgate catalog lint`, `opsgate doctor`
and the worker report the findings, and a strict catalog (OPSGATE_CATALOG_STRICT)
refuses to load with any.
"""

from __future__ import annotations

from dataclasses import dataclass

from opsgate.models import ActionType, VerificationSpec
from opsgate.verification.lookback import evidence_floor

__all__ = ["Finding", "lint_action_type", "lint_verification"]


@dataclass(frozen=True)
class Finding:
    action_type: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.action_type}: {self.field}: {self.message}"


def lint_verification(
    name: str, spec: VerificationSpec, *, scrape_interval: float, evidence_after: str = "run_end"
) -> list[Finding]:
    findings: list[Finding] = []
    if not spec.signals:
        return findings
    floor = evidence_floor((s.query for s in spec.signals), scrape_interval)
    if evidence_after == "run_start":
        floor = 0.0  # the run's own duration may cover it: nothing to say before it runs
    counting = max(floor, spec.initial_delay)
    if counting + spec.hold > spec.timeout:
        findings.append(
            Finding(
                name,
                "verification.timeout",
                f"hold {spec.hold:g}s starts only after {counting:g}s of waiting for "
                f"post-change evidence (longest query window plus a {scrape_interval:g}s "
                f"scrape, or initial_delay), so timeout {spec.timeout:g}s can never be met; "
                f"raise timeout to at least {counting + spec.hold:g}s",
            )
        )
    return findings


def lint_intent(action_type: ActionType) -> list[Finding]:
    """Stop conditions that contradict what the action type says it is for."""
    findings: list[Finding] = []
    name = action_type.name
    for index, stop in enumerate(action_type.verification.stop_conditions):
        where = f"verification.stop_conditions.{index}.halt"
        halt = stop.halt
        worse_bound = halt.min if stop.worse_when == "higher" else halt.max
        if action_type.intent == "mitigation" and worse_bound is not None and not halt.relative:
            findings.append(
                Finding(
                    name,
                    where,
                    f"a mitigation runs while {stop.name} is bad: an absolute halt at "
                    f"{worse_bound:g} trips at once during an incident past it; halt on "
                    "worse than before (baseline_plus or baseline_times)",
                )
            )
        if halt.baseline_times is not None and stop.worse_when == "higher":
            findings.append(
                Finding(
                    name,
                    where,
                    f"halt at baseline * {halt.baseline_times:g} fires at once when the "
                    f"baseline of {stop.name} is 0; use baseline_plus",
                )
            )
    return findings


def lint_action_type(action_type: ActionType, *, scrape_interval: float) -> list[Finding]:
    return lint_verification(
        action_type.name,
        action_type.verification,
        scrape_interval=scrape_interval,
        evidence_after=action_type.evidence_after,
    ) + lint_intent(action_type)
