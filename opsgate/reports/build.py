"""Reports as plain data: tables, headline sentences, chart series; renderers format them.

Every report compares its window with the previous window of the same length and says
in one or two sentences which figure moved most and which segment moved it: the cut
(one segment, or a pair of them) whose change explains most of the overall change,
with the cause that grew most inside it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import combinations
from typing import Any

from opsgate.reports.queries import (
    CAUSES,
    SEGMENT_NAMES,
    ApprovalRow,
    BlocksCube,
    ReportQueries,
    RollbackRow,
    VerificationRow,
    Window,
    rollup_blocks,
    rollup_verification,
)

# Cuts searched for "which segment moved it": every single segment and these pairs.
_PAIRS = [("incident_class", "severity"), ("incident_class", "tier"), ("action", "environment")]
_PAIRS += [(a, b) for a, b in combinations(SEGMENT_NAMES, 2) if (a, b) not in _PAIRS]
MIN_SHARE = 0.5
CAUSE_COLUMNS = [
    "stopped",
    "failed",
    "timeout",
    "provider errors",
    "runner error",
    "manual",
]  # a pair is named when it explains at least half of the change


def column_key(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")


@dataclass
class Table:
    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""
    kinds: dict[str, str] = field(default_factory=dict)  # column -> "rate" | "seconds"
    # (row index, column) -> what people read instead of the bare figure, e.g. "50.0%:
    # 1 of 2 runs, too few to judge"; tools get the number and a `too_few_runs` column.
    caveats: dict[tuple[int, str], str] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        """Column names as JSON/CSV keys: `pass rate` -> `pass_rate`."""
        return [column_key(c) for c in self.columns]

    def records(self) -> list[dict[str, Any]]:
        """Rows as objects keyed by `keys`, raw values (numbers stay numbers)."""
        return [dict(zip(self.keys, row, strict=True)) for row in self.rows]

    def formatted(self) -> list[list[str]]:
        """Rows for people: rates as percentages, seconds as durations."""
        out = []
        for index, row in enumerate(self.rows):
            cells = []
            for column, value in zip(self.columns, row, strict=True):
                kind = self.kinds.get(column)
                if (index, column) in self.caveats:
                    cells.append(self.caveats[(index, column)])
                elif isinstance(value, bool):
                    cells.append("yes" if value else "")
                elif kind == "rate":
                    cells.append(pct(value))
                elif kind == "seconds":
                    cells.append(secs(value))
                elif isinstance(value, Mapping):
                    cells.append(", ".join(f"{k} {v}" for k, v in value.items()) or "-")
                else:
                    cells.append("-" if value is None else str(value))
            out.append(cells)
        return out


@dataclass
class Report:
    kind: str
    title: str
    window: Window
    previous: Window
    by: str | None
    where: Mapping[str, str]
    headline: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    charts: dict[str, Any] = field(default_factory=dict)
    generated_at: datetime | None = None


DEFAULT_MIN_RUNS = 5


def too_few(n: int, of: int, what: str, min_runs: int) -> str:
    return f"{n} of {of} {what}, too few to judge (fewer than {min_runs})"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def secs(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.1f}m"
    return f"{value / 3600:.1f}h"


def _raw(value: float | None) -> float | None:
    """Tables keep raw numbers (rates as fractions, durations in seconds); the human
    renderers format them by the table's column kinds."""
    return None if value is None else round(value, 6)


def _points(value: float) -> str:
    return f"{value:+.1f}"


def _rate(n: int, d: int) -> float | None:
    return n / d if d else None


def _moved(verb_up: str, verb_down: str, now: float | None, before: float | None) -> str:
    if now is None or before is None:
        return "changed"
    if abs(now - before) < 1e-12:
        return "held"
    return verb_up if now > before else verb_down


def _explain(
    cells_now: Mapping[tuple[str, ...], tuple[float, float]],
    cells_before: Mapping[tuple[str, ...], tuple[float, float]],
    total_now: float,
    total_before: float,
) -> tuple[tuple[str, ...], str, float] | None:
    """The cut whose (numerator / overall denominator) change explains most of the
    overall rate change. Cells map full segment tuples to (numerator, denominator)."""
    change = (sum(n for n, _ in cells_now.values()) / total_now if total_now else 0.0) - (
        sum(n for n, _ in cells_before.values()) / total_before if total_before else 0.0
    )
    if abs(change) < 1e-12:
        return None
    best: dict[int, tuple[tuple[str, ...], str, float]] = {}
    for keys in [*((k,) for k in SEGMENT_NAMES), *_PAIRS]:
        idx = [SEGMENT_NAMES.index(k) for k in keys]
        contrib: dict[str, float] = {}
        for cells, total, sign in ((cells_now, total_now, 1), (cells_before, total_before, -1)):
            if not total:
                continue
            for dims, (num, _den) in cells.items():
                label = " ".join(dims[i] for i in idx)
                contrib[label] = contrib.get(label, 0.0) + sign * num / total
        for label, value in contrib.items():
            share = value / change
            if share > 0 and (len(keys) not in best or share > best[len(keys)][2]):
                best[len(keys)] = (keys, label, share)
    # The more specific cut when it explains at least half of the change.
    if 2 in best and best[2][2] >= MIN_SHARE:
        return best[2]
    return best.get(1)


# --- verification ---------------------------------------------------------------------------


def _verification_cells(
    cube: Sequence[tuple[tuple[str, ...], str | None, str | None, int]],
) -> tuple[dict[tuple[str, ...], tuple[float, float]], int]:
    """Failures (finished but not succeeded) per cell, and finished runs overall."""
    cells: dict[tuple[str, ...], tuple[float, float]] = {}
    finished = 0
    for dims, outcome, _trigger, n in cube:
        if outcome is None:
            continue
        finished += n
        fail, den = cells.get(dims, (0.0, 0.0))
        cells[dims] = (fail + (n if outcome != "succeeded" else 0), den + n)
    return cells, finished


def _top_cause(
    cube: Sequence[tuple[tuple[str, ...], str | None, str | None, int]],
    keys: Sequence[str],
    label: str,
) -> str:
    idx = [SEGMENT_NAMES.index(k) for k in keys]
    causes: dict[str, int] = {}
    for dims, outcome, trigger, n in cube:
        if outcome in (None, "succeeded") or " ".join(dims[i] for i in idx) != label:
            continue
        name = f"halted by {trigger}" if outcome == "stopped" and trigger else _cause_text(outcome)
        causes[name] = causes.get(name, 0) + n
    return max(causes.items(), key=lambda kv: kv[1])[0] if causes else ""


def _cause_text(outcome: str | None) -> str:
    return {
        "stopped": "halted by a stop condition",
        "failed_verification": "failing verification",
        "timeout": "timing out before hold",
        "provider_errors": "unreadable signals",
        "runner_error": "runner errors",
        "manual": "manual rollbacks",
    }.get(outcome or "", str(outcome))


def verification_report(
    q: ReportQueries,
    window: Window,
    by: str | None,
    where: Mapping[str, str],
    *,
    min_runs: int = DEFAULT_MIN_RUNS,
) -> Report:
    cube_now = q.verification_cube(window, where)
    cube_before = q.verification_cube(window.previous(), where)
    keys = (by,) if by else ()
    rows = rollup_verification(cube_now, keys)
    before = {r.segment: r for r in rollup_verification(cube_before, keys)}
    [now_all] = rollup_verification(cube_now, ()) or [VerificationRow("all")]
    [prev_all] = rollup_verification(cube_before, ()) or [VerificationRow("all")]
    report = Report(
        "verification",
        "Verification pass rate",
        window,
        window.previous(),
        by,
        where,
    )
    report.headline.append(
        f"Pass rate {pct(now_all.pass_rate)} ({now_all.succeeded} of {now_all.finished} "
        f"finished runs) against {pct(prev_all.pass_rate)} ({prev_all.succeeded} of "
        f"{prev_all.finished}) in the previous window."
    )
    cells_now, fin_now = _verification_cells(cube_now)
    cells_before, fin_before = _verification_cells(cube_before)
    found = _explain(cells_now, cells_before, fin_now, fin_before)
    judged = now_all.finished >= min_runs and prev_all.finished >= min_runs
    if not judged:
        report.headline.append(
            f"Too few runs to judge a change: {now_all.finished} and {prev_all.finished} "
            f"finished runs in the two windows (at least {min_runs} needed)."
        )
    if judged and found and now_all.pass_rate is not None and prev_all.pass_rate is not None:
        keys_found, label, share = found
        moved = _moved("rose", "fell", now_all.pass_rate, prev_all.pass_rate)
        cause = _top_cause(cube_now if moved == "fell" else cube_before, keys_found, label)
        part = "drop" if moved == "fell" else "rise"
        what = f"{label} actions" + (f" {cause}" if cause and moved == "fell" else "")
        change = (now_all.pass_rate - prev_all.pass_rate) * 100
        report.headline.append(
            f"Pass rate {moved} from {pct(prev_all.pass_rate)} to {pct(now_all.pass_rate)}; "
            f"most of the {part} is {what} ({' x '.join(keys_found)}: "
            f"{_points(share * change)} "
            f"of the {change:+.1f} points)."
        )
    columns = ["segment", "started", "finished", "succeeded", "pass rate", "previous"]
    columns += [*CAUSE_COLUMNS, "in progress", "stops by name", "too few runs"]
    table_rows = []
    caveats: dict[tuple[int, str], str] = {}
    for index, row in enumerate(rows):
        few = row.finished < min_runs
        if few:
            caveats[(index, "pass rate")] = (
                f"{pct(row.pass_rate)}: {too_few(row.succeeded, row.finished, 'runs', min_runs)}"
            )
        prev = before.get(row.segment)
        fired = dict(sorted(row.stop_conditions.items()))  # an object in JSON, not a string
        table_rows.append(
            [
                row.segment,
                row.started,
                row.finished,
                row.succeeded,
                _raw(row.pass_rate),
                prev.pass_rate if prev else None,
                *(row.causes.get(c, 0) for c in CAUSES),
                row.in_progress,
                fired,
                few,
            ]
        )
    report.tables.append(
        Table(
            "verification",
            f"Verification by {by or 'all'}",
            columns,
            table_rows,
            "pass rate = succeeded / finished runs started in the window; the rest by cause",
            kinds={"pass rate": "rate", "previous": "rate"},
            caveats=caveats,
        )
    )
    stops: dict[str, int] = {}
    for row in rows:
        for name, n in row.stop_conditions.items():
            stops[name] = stops.get(name, 0) + n
    report.tables.append(
        Table(
            "stop_conditions",
            "Stop-condition activations",
            ["stop condition", "activations", "rate (of runs started)"],
            [
                [name, n, _raw(_rate(n, now_all.started))]
                for name, n in sorted(stops.items(), key=lambda kv: -kv[1])
            ],
            kinds={"rate (of runs started)": "rate"},
        )
    )
    report.charts["pass_rate_by_day"] = q.pass_rate_by_day(window, where)
    report.charts["stop_conditions"] = stops
    return report


# --- rollbacks ------------------------------------------------------------------------------


def rollbacks_report(
    q: ReportQueries,
    window: Window,
    by: str | None,
    where: Mapping[str, str],
    *,
    min_runs: int = DEFAULT_MIN_RUNS,
) -> Report:
    """Automatic rollbacks (a stop condition, a failed verification, a runner error) and
    manual ones (`opsgate rollback`) apart: a person's decision is not the system's
    reaction time."""
    rows = q.rollbacks(window, by, where, manual=False)
    [now_all] = q.rollbacks(window, None, where, keep_durations=True, manual=False) or [
        RollbackRow("all")
    ]
    [prev_all] = q.rollbacks(window.previous(), None, where, manual=False) or [RollbackRow("all")]
    manual = q.rollbacks(window, by, where, manual=True)
    manual_total = sum(r.decided for r in manual)
    report = Report("rollbacks", "Rollback time", window, window.previous(), by, where)
    if now_all.verified < min_runs:
        report.headline.append(
            f"Automatic rollback time: "
            f"{too_few(now_all.verified, now_all.decided, 'rollbacks verified', min_runs)}"
            + (f" (p90 {secs(now_all.p90)})." if now_all.p90 is not None else ".")
        )
    else:
        report.headline.append(
            f"Automatic rollback time p90 {secs(now_all.p90)} (p50 {secs(now_all.p50)}, max "
            f"{secs(now_all.max)}) over {now_all.verified} verified rollbacks, against p90 "
            f"{secs(prev_all.p90)} before; {now_all.never_verified} of {now_all.decided} "
            "rollbacks never verified."
        )
    if manual_total:
        report.headline.append(
            f"{manual_total} manual rollback(s) (`opsgate rollback`) are reported apart."
        )
    slowest = [
        r
        for r in q.rollbacks(window, by or "action", where, manual=False)
        if r.verified >= max(3, min_runs)
    ]
    if slowest and now_all.p90 is not None:
        worst = max(slowest, key=lambda r: r.p90 or 0.0)
        report.headline.append(
            f"Slowest: {worst.segment} (p90 {secs(worst.p90)} over {worst.verified} rollbacks, "
            f"{worst.never_verified} never verified)."
        )
    columns = ["segment", "decided", "verified", "never verified", "p50", "p90", "max"]
    columns.append("too few runs")
    kinds = {"p50": "seconds", "p90": "seconds", "max": "seconds"}
    for name, title, found in (
        ("rollbacks", f"Automatic rollback time by {by or 'all'}", rows),
        ("manual_rollbacks", f"Manual rollbacks by {by or 'all'}", manual),
    ):
        caveats: dict[tuple[int, str], str] = {}
        table_rows = []
        for index, r in enumerate(found):
            few = r.verified < min_runs
            if few:
                caveats[(index, "p90")] = (
                    f"{secs(r.p90)}: {too_few(r.verified, r.decided, 'verified', min_runs)}"
                )
            table_rows.append(
                [
                    r.segment,
                    r.decided,
                    r.verified,
                    r.never_verified,
                    _raw(r.p50),
                    _raw(r.p90),
                    _raw(r.max),
                    few,
                ]
            )
        report.tables.append(
            Table(
                name,
                title,
                columns,
                table_rows,
                "rollback time = rollback decided -> rollback verification passed",
                kinds=kinds,
                caveats=caveats,
            )
        )
    report.charts["rollback_durations"] = now_all.durations
    return report


# --- blocks ---------------------------------------------------------------------------------


def _blocks_cells(cube: BlocksCube) -> tuple[dict[tuple[str, ...], tuple[float, float]], int]:
    cells = {dims: (float(blocked), float(decided)) for dims, decided, blocked in cube.totals}
    return cells, sum(decided for _, decided, _ in cube.totals)


def blocks_report(
    q: ReportQueries, window: Window, by: str | None, where: Mapping[str, str]
) -> Report:
    report = Report("blocks", "Policy blocks", window, window.previous(), by, where)
    for phase in ("propose", "execute"):
        cube = q.blocks_cube(window, where, phase=phase)
        cube_before = q.blocks_cube(window.previous(), where, phase=phase)
        [total] = rollup_blocks(cube, ()) or [None]  # type: ignore[list-item]
        [previous] = rollup_blocks(cube_before, ()) or [None]  # type: ignore[list-item]
        decided = total.decided if total else 0
        blocked = total.blocked if total else 0
        rate, before = _rate(blocked, decided), previous.block_rate if previous else None
        label = "at proposal" if phase == "propose" else "at execution"
        report.headline.append(
            f"Blocked {label}: {pct(rate)} ({blocked} of {decided}) against {pct(before)} "
            "in the previous window."
        )
        cells_now, n_now = _blocks_cells(cube)
        cells_before, n_before = _blocks_cells(cube_before)
        found = _explain(cells_now, cells_before, n_now, n_before)
        if found and rate is not None and before is not None and phase == "propose":
            keys, seg, share = found
            codes: dict[str, int] = {}
            idx = [SEGMENT_NAMES.index(k) for k in keys]
            for dims, code, n in cube.first_code:
                if " ".join(dims[i] for i in idx) == seg:
                    codes[code] = codes.get(code, 0) + n
            top = max(codes.items(), key=lambda kv: kv[1])[0] if codes else ""
            change = (rate - before) * 100
            report.headline.append(
                f"Block rate {_moved('rose', 'fell', rate, before)} from {pct(before)} to "
                f"{pct(rate)}; most of it is {seg} proposals"
                + (f" denied {top}" if top and rate > before else "")
                + f" ({' x '.join(keys)}: {_points(share * change)} of the {change:+.1f} points)."
            )
        if by in (None, "code"):
            with_code = total.with_code if total else {}
            first = total.first_code if total else {}
            prev_codes = previous.with_code if previous else {}
            rows = [
                [code, n, _raw(_rate(n, decided)), first.get(code, 0), prev_codes.get(code, 0)]
                for code, n in sorted(with_code.items(), key=lambda kv: (-kv[1], kv[0]))
            ]
            report.tables.append(
                Table(
                    f"blocks_{phase}",
                    f"Blocks {label} by deny code",
                    ["code", "decisions with code", "rate", "as first code", "previous"],
                    rows,
                    "a decision carrying several codes counts under each of them in "
                    "'decisions with code' (sums to more than the blocked total) and once, "
                    "under its first code, in 'as first code' (sums to the blocked total)",
                    kinds={"rate": "rate"},
                )
            )
            if phase == "propose":
                report.charts["blocks_by_code"] = with_code
        else:
            keyed = rollup_blocks(cube, (by,))
            earlier = {r.segment: r for r in rollup_blocks(cube_before, (by,))}
            report.tables.append(
                Table(
                    f"blocks_{phase}",
                    f"Blocks {label} by {by}",
                    ["segment", "decided", "blocked", "rate", "previous", "top codes"],
                    [
                        [
                            r.segment,
                            r.decided,
                            r.blocked,
                            _raw(r.block_rate),
                            earlier[r.segment].block_rate if r.segment in earlier else None,
                            dict(sorted(r.with_code.items(), key=lambda kv: -kv[1])[:3]),
                        ]
                        for r in keyed
                    ],
                    kinds={"rate": "rate", "previous": "rate"},
                )
            )
            if phase == "propose":
                report.charts["blocks_by_code"] = total.with_code if total else {}
    shadow = _shadow_table(q, window, where)
    if shadow is not None:
        blocked = sum(row[2] for row in shadow.rows)
        report.headline.append(
            f"The shadow bundle would have blocked {blocked} decision(s) the enforced one allowed."
        )
        report.tables.append(shadow)
    return report


def _shadow_table(q: ReportQueries, window: Window, where: Mapping[str, str]) -> Table | None:
    verdicts = q.shadow(window, where)
    if not verdicts:
        return None
    rows = []
    for phase, row in sorted(verdicts.items()):
        codes = dict(sorted(row["codes"].items(), key=lambda kv: -kv[1]))
        rows.append([phase, row["evaluated"], row["would_block"], row["would_allow"], codes])
    return Table(
        "shadow",
        "Shadow bundle (never enforced)",
        ["phase", "evaluated", "would have blocked", "would have allowed", "codes"],
        rows,
        "decisions the enforced bundle allowed but the shadow bundle denied, and the reverse",
    )


# --- approvals ------------------------------------------------------------------------------


def approvals_report(
    q: ReportQueries, window: Window, by: str | None, where: Mapping[str, str]
) -> Report:
    rows = q.approvals(window, by, where)
    [now_all] = q.approvals(window, None, where) or [ApprovalRow("all")]
    [prev_all] = q.approvals(window.previous(), None, where) or [ApprovalRow("all")]
    report = Report("approvals", "Approvals", window, window.previous(), by, where)
    report.headline.append(
        f"Time to approval p90 {secs(now_all.p90)} (p50 {secs(now_all.p50)}) against p90 "
        f"{secs(prev_all.p90)} before; {pct(now_all.rejection_rate)} rejected and "
        f"{pct(now_all.expiry_rate)} expired of {now_all.waited} actions that waited."
    )
    report.tables.append(
        Table(
            "approvals",
            f"Approvals by {by or 'all'}",
            [
                "segment",
                "waited",
                "approved",
                "p50",
                "p90",
                "rejected",
                "rejection rate",
                "expired",
                "expiry rate",
                "cancelled",
                "pending",
            ],
            [
                [
                    r.segment,
                    r.waited,
                    r.approved,
                    _raw(r.p50),
                    _raw(r.p90),
                    r.rejected,
                    _raw(r.rejection_rate),
                    r.expired,
                    _raw(r.expiry_rate),
                    r.cancelled,
                    r.pending,
                ]
                for r in rows
            ],
            "time to approval = proposed -> final approval; rates over actions that waited",
            kinds={
                "p50": "seconds",
                "p90": "seconds",
                "rejection rate": "rate",
                "expiry rate": "rate",
            },
        )
    )
    return report


# --- the one-screen summary -----------------------------------------------------------------


def summary_report(
    q: ReportQueries,
    window: Window,
    where: Mapping[str, str],
    *,
    min_runs: int = DEFAULT_MIN_RUNS,
) -> Report:
    parts = [
        verification_report(q, window, None, where, min_runs=min_runs),
        rollbacks_report(q, window, None, where, min_runs=min_runs),
        blocks_report(q, window, None, where),
        approvals_report(q, window, None, where),
    ]
    report = Report("summary", "opsgate governance summary", window, window.previous(), None, where)
    for part in parts:
        report.headline.extend(part.headline)
        report.tables.extend(part.tables)
        report.charts.update(part.charts)
    return report


BUILDERS = {
    "verification": verification_report,
    "rollbacks": rollbacks_report,
    "blocks": blocks_report,
    "approvals": approvals_report,
}
