"""`opsgate report proposers`: a scorecard per proposer (per action type with
`--by action`), from the same queries as every other report, narrowed to one proposer,
and the trust-ladder rung each has today."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from opsgate.reports.build import (
    DEFAULT_MIN_RUNS,
    Report,
    Table,
    _rate,
    _raw,
    pct,
    too_few,
)
from opsgate.reports.queries import SEGMENT_NAMES, ReportQueries, Window, proposers_in

_ACTION = SEGMENT_NAMES.index("action")
_ENVIRONMENT = SEGMENT_NAMES.index("environment")
ALL = "all"

# (proposer id, kind, action type, environment) -> the rung the bundle gives it today.
RungOf = Callable[[str, str, str, str], str | None]


@dataclass
class Card:
    proposals: int = 0
    blocked: int = 0
    by_code: dict[str, int] = field(default_factory=dict)
    waited: int = 0
    approved: int = 0
    rejected: int = 0
    started: int = 0
    finished: int = 0
    passes: int = 0
    stopped: int = 0
    rollbacks: int = 0  # automatic, decided in the window
    p50: float | None = None
    p90: float | None = None
    places: set[tuple[str, str]] = field(default_factory=set)  # (action, environment)

    @property
    def block_rate(self) -> float | None:
        return _rate(self.blocked, self.proposals)

    @property
    def pass_rate(self) -> float | None:
        return _rate(self.passes, self.finished)


def cards(
    q: ReportQueries, window: Window, proposer: str, by: str | None, where: Mapping[str, str]
) -> dict[str, Card]:
    """One proposer's figures, whole or per action type."""
    out: dict[str, Card] = {}

    def label(dims: tuple[str, ...]) -> str:
        return dims[_ACTION] if by else ALL

    for dims, outcome, _trigger, n in q.verification_cube(window, where, proposer=proposer):
        card = out.setdefault(label(dims), Card())
        card.started += n
        if outcome is not None:
            card.finished += n
            card.passes += n if outcome == "succeeded" else 0
            card.stopped += n if outcome == "stopped" else 0
    blocks = q.blocks_cube(window, where, proposer=proposer)
    for dims, decided, blocked in blocks.totals:
        card = out.setdefault(label(dims), Card())
        card.proposals += decided
        card.blocked += blocked
        card.places.add((dims[_ACTION], dims[_ENVIRONMENT]))
    for dims, code, n in blocks.with_code:
        codes = out[label(dims)].by_code
        codes[code] = codes.get(code, 0) + n
    for row in q.approvals(window, by, where, proposer=proposer, counts_only=True):
        card = out.setdefault(row.segment, Card())
        card.waited, card.approved, card.rejected = row.waited, row.approved, row.rejected
    for r in q.rollbacks(window, by, where, manual=False, proposer=proposer):
        card = out.setdefault(r.segment, Card())
        card.rollbacks, card.p50, card.p90 = r.decided, r.p50, r.p90
    return out


COLUMNS = [
    "proposer",
    "kind",
    "action",
    "proposals",
    "blocked",
    "block rate",
    "block rate before",
    "blocks by code",
    "approved",
    "approval rate",
    "rejected",
    "rejection rate",
    "runs",
    "finished",
    "verified passes",
    "pass rate",
    "pass rate before",
    "stop conditions",
    "stop rate",
    "automatic rollbacks",
    "rollback p50",
    "rollback p90",
    "rung",
    "too few runs",
]
KINDS = {
    "block rate": "rate",
    "block rate before": "rate",
    "approval rate": "rate",
    "rejection rate": "rate",
    "pass rate": "rate",
    "pass rate before": "rate",
    "stop rate": "rate",
    "rollback p50": "seconds",
    "rollback p90": "seconds",
}


def proposers_report(
    q: ReportQueries,
    window: Window,
    by: str | None,
    where: Mapping[str, str],
    *,
    kind: str | None = None,
    min_runs: int = DEFAULT_MIN_RUNS,
    rung_of: RungOf | None = None,
) -> Report:
    if by not in (None, "action"):
        raise ValueError("proposers are cut by action only")
    who = "agents" if kind == "agent" else "humans" if kind == "human" else "proposers"
    report = Report("proposers", f"Scorecard of {who}", window, window.previous(), by, where)
    rows: list[list[object]] = []
    caveats: dict[tuple[int, str], str] = {}
    totals = {"now": Card(), "before": Card()}
    for proposer, proposer_kind in proposers_in(q, window, kind):
        now = cards(q, window, proposer, by, where)
        before = cards(q, window.previous(), proposer, by, where)
        for name, card_set in (("now", now), ("before", before)):
            total = totals[name]
            for card in card_set.values():
                total.proposals += card.proposals
                total.blocked += card.blocked
                total.finished += card.finished
                total.passes += card.passes
        for segment in sorted(now):
            card, prev = now[segment], before.get(segment, Card())
            rungs: dict[str, str] = {}
            if rung_of is not None:
                for action, environment in sorted(card.places):
                    rung = rung_of(proposer, proposer_kind, action, environment)
                    if rung is not None:
                        rungs[environment if by else f"{action}@{environment}"] = rung
            few = card.finished < min_runs
            index = len(rows)
            if few:
                caveats[(index, "pass rate")] = (
                    f"{pct(card.pass_rate)}: "
                    f"{too_few(card.passes, card.finished, 'runs passed', min_runs)}"
                )
            rows.append(
                [
                    proposer,
                    proposer_kind,
                    segment if by else ALL,
                    card.proposals,
                    card.blocked,
                    _raw(card.block_rate),
                    _raw(prev.block_rate),
                    dict(sorted(card.by_code.items(), key=lambda kv: (-kv[1], kv[0]))),
                    card.approved,
                    _raw(_rate(card.approved, card.waited)),
                    card.rejected,
                    _raw(_rate(card.rejected, card.waited)),
                    card.started,
                    card.finished,
                    card.passes,
                    _raw(card.pass_rate),
                    _raw(prev.pass_rate),
                    card.stopped,
                    _raw(_rate(card.stopped, card.started)),
                    card.rollbacks,
                    _raw(card.p50),
                    _raw(card.p90),
                    rungs,
                    few,
                ]
            )
    now_total, before_total = totals["now"], totals["before"]
    report.headline.append(
        f"{len({r[0] for r in rows})} {who}: verification pass rate {pct(now_total.pass_rate)} "
        f"({now_total.passes} of {now_total.finished} finished runs) against "
        f"{pct(before_total.pass_rate)} before; block rate {pct(now_total.block_rate)} of "
        f"{now_total.proposals} proposals against {pct(before_total.block_rate)} before."
    )
    rate, finished = COLUMNS.index("pass rate"), COLUMNS.index("finished")
    judged = [r for r in rows if not r[-1] and isinstance(r[rate], float)]
    if judged:
        worst = min(judged, key=lambda r: (float(r[rate]), str(r[0])))  # type: ignore[arg-type]
        report.headline.append(
            f"Lowest pass rate: {worst[0]}"
            + (f" on {worst[2]}" if by else "")
            + f" ({pct(worst[rate])} of {worst[finished]} runs)."  # type: ignore[arg-type]
        )
    report.tables.append(
        Table(
            "proposers",
            f"Proposers by {'action' if by else 'proposer'}",
            COLUMNS,
            rows,
            "rates as in the other reports; pass rate over finished runs; rung: the trust "
            "ladder's rung today, per action type and environment proposed in",
            kinds=KINDS,
            caveats=caveats,
        )
    )
    return report
