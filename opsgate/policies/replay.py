"""Policy replay: the stored inputs of past decisions, re-evaluated under a candidate
bundle, and what would have changed. Read-only: nothing is written."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from opsgate.models import Decision
from opsgate.policies.engine import DECISION_RULE, PolicyEngine


@dataclass
class ReplayResult:
    revision_before: set[str] = field(default_factory=set)
    revision_after: str = ""
    replayed: int = 0
    skipped: int = 0  # decisions opsgate made itself, without a policy input
    unchanged: int = 0
    newly_blocked: list[dict[str, Any]] = field(default_factory=list)
    newly_allowed: list[dict[str, Any]] = field(default_factory=list)
    approvals_changed: list[dict[str, Any]] = field(default_factory=list)
    codes_changed: list[dict[str, Any]] = field(default_factory=list)
    codes_before: Counter[str] = field(default_factory=Counter)
    codes_after: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        return {
            "replayed": self.replayed,
            "skipped": self.skipped,
            "unchanged": self.unchanged,
            "bundle_revisions_before": sorted(self.revision_before),
            "bundle_revision_after": self.revision_after,
            "newly_blocked": self.newly_blocked,
            "newly_allowed": self.newly_allowed,
            "approvals_changed": self.approvals_changed,
            "codes_changed": self.codes_changed,
            "deny_codes": {
                code: {"before": self.codes_before[code], "after": self.codes_after[code]}
                for code in sorted(set(self.codes_before) | set(self.codes_after))
            },
        }


def replay(decisions: Iterable[Decision], candidate: PolicyEngine) -> ReplayResult:
    """Compare each decision with the candidate's answer to the very same input."""
    result = ReplayResult(revision_after=candidate.revision())
    for decision in decisions:
        if not decision.input or decision.engine == "opsgate":
            result.skipped += 1
            continue
        result.replayed += 1
        result.revision_before.add(decision.bundle_revision)
        after = candidate.evaluate(DECISION_RULE, decision.input)
        before_codes = sorted(set(decision.deny_codes))
        after_codes = sorted(set(after.deny_codes))
        result.codes_before.update(before_codes)
        result.codes_after.update(after_codes)
        base = {
            "action_id": decision.action_id,
            "phase": decision.phase,
            "decided_at": decision.decided_at.isoformat(),
            "action": decision.input.get("action", {}).get("type"),
            "target": decision.input.get("action", {}).get("target"),
        }
        if decision.allow and not after.allow:
            result.newly_blocked.append(
                {**base, "codes": after_codes, "messages": [d["message"] for d in after.deny]}
            )
        elif not decision.allow and after.allow:
            result.newly_allowed.append({**base, "codes_before": before_codes})
        elif decision.allow and (
            decision.required_approvals != after.required_approvals
            or sorted(decision.approver_roles) != sorted(after.approver_roles)
        ):
            result.approvals_changed.append(
                {
                    **base,
                    "before": {
                        "required_approvals": decision.required_approvals,
                        "approver_roles": sorted(decision.approver_roles),
                    },
                    "after": {
                        "required_approvals": after.required_approvals,
                        "approver_roles": sorted(after.approver_roles),
                    },
                }
            )
        elif not decision.allow and before_codes != after_codes:
            result.codes_changed.append(
                {**base, "codes_before": before_codes, "codes_after": after_codes}
            )
        else:
            result.unchanged += 1
    return result


def to_markdown(result: ReplayResult, since: str, until: str) -> str:
    """A review-ticket summary of what the candidate bundle would change."""
    lines = [
        "## Policy replay",
        "",
        f"_{result.replayed} decisions from {since} to {until} re-evaluated under bundle "
        f"`{result.revision_after[:19]}`; nothing was written._",
        "",
        f"- newly blocked: **{len(result.newly_blocked)}**",
        f"- newly allowed: **{len(result.newly_allowed)}**",
        f"- approvals changed: **{len(result.approvals_changed)}**",
        f"- deny codes changed (still blocked): {len(result.codes_changed)}",
        f"- unchanged: {result.unchanged}",
        "",
        "| deny code | before | after |",
        "|---|---|---|",
    ]
    for code in sorted(set(result.codes_before) | set(result.codes_after)):
        lines.append(f"| {code} | {result.codes_before[code]} | {result.codes_after[code]} |")
    for title, rows, key in (
        ("Newly blocked", result.newly_blocked, "codes"),
        ("Newly allowed", result.newly_allowed, "codes_before"),
    ):
        if rows:
            lines += [
                "",
                f"### {title}",
                "",
                "| action | type | target | codes |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {r['action_id']} | {r['action']} | {r['target']} | {', '.join(r[key])} |"
                for r in rows
            ]
    if result.approvals_changed:
        lines += ["", "### Approvals changed", "", "| action | before | after |", "|---|---|---|"]
        for r in result.approvals_changed:
            b, a = r["before"], r["after"]
            lines.append(
                f"| {r['action_id']} | {b['required_approvals']} of {'|'.join(b['approver_roles'])}"
                f" | {a['required_approvals']} of {'|'.join(a['approver_roles'])} |"
            )
    return "\n".join(lines) + "\n"
