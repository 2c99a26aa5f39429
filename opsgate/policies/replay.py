"""Policy replay: the stored inputs of past decisions, re-evaluated under a candidate
bundle, and what would have changed. Read-only: nothing is written."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
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
    # Decisions made before inputs carried a track record, given one as of their time.
    filled: int = 0
    # proposer -> decisions, approvals added / saved (allowed both times), newly blocked
    # and newly allowed: what a candidate trust ladder would have cost or spared.
    per_proposer: dict[str, dict[str, int]] = field(default_factory=dict)

    def _tally(self, proposer: str, key: str, n: int = 1) -> None:
        row = self.per_proposer.setdefault(
            proposer,
            {
                "decisions": 0,
                "approvals_added": 0,
                "approvals_saved": 0,
                "newly_blocked": 0,
                "newly_allowed": 0,
            },
        )
        row[key] += n

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
            "track_records_filled": self.filled,
            "per_proposer": {p: dict(v) for p, v in sorted(self.per_proposer.items())},
        }


# A decision stored without `proposer.track_record` -> its input with the record as of
# its time (None: leave it as it was).
FillRecord = Callable[[Decision], dict[str, Any] | None]


def _proposer_of(document: Mapping[str, Any]) -> str:
    proposer = document.get("proposer")
    return str(proposer.get("id", "")) if isinstance(proposer, Mapping) else ""


def _has_record(document: Mapping[str, Any]) -> bool:
    proposer = document.get("proposer")
    return isinstance(proposer, Mapping) and isinstance(proposer.get("track_record"), Mapping)


def replay(
    decisions: Iterable[Decision], candidate: PolicyEngine, fill: FillRecord | None = None
) -> ReplayResult:
    """Compare each decision with the candidate's answer to the very same input (with the
    proposer's track record as of then, for decisions stored before inputs had one)."""
    result = ReplayResult(revision_after=candidate.revision())
    for decision in decisions:
        if not decision.input or decision.engine == "opsgate":
            result.skipped += 1
            continue
        result.replayed += 1
        result.revision_before.add(decision.bundle_revision)
        document: Mapping[str, Any] = decision.input
        if fill is not None and not _has_record(document):
            filled = fill(decision)
            if filled is not None:
                document = filled
                result.filled += 1
        after = candidate.evaluate(DECISION_RULE, document)
        proposer = _proposer_of(document)
        result._tally(proposer, "decisions")
        if decision.allow and not after.allow:
            result._tally(proposer, "newly_blocked")
        elif not decision.allow and after.allow:
            result._tally(proposer, "newly_allowed")
        elif decision.allow:
            change = after.required_approvals - decision.required_approvals
            result._tally(proposer, "approvals_added", max(change, 0))
            result._tally(proposer, "approvals_saved", max(-change, 0))
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
    if result.per_proposer:
        lines += [
            "",
            "### Per proposer (approvals added and saved where both bundles allow)",
            "",
            "| proposer | decisions | approvals added | approvals saved | newly blocked "
            "| newly allowed |",
            "|---|---|---|---|---|---|",
        ]
        for proposer, row in sorted(result.per_proposer.items()):
            lines.append(
                f"| {proposer} | {row['decisions']} | {row['approvals_added']} "
                f"| {row['approvals_saved']} | {row['newly_blocked']} | {row['newly_allowed']} |"
            )
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
