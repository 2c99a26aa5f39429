"""Governance figures as SQL aggregates over the store, the same on SQLite and PostgreSQL.

Counting is done by the database (GROUP BY, json_each / jsonb_array_elements_text for
deny codes); percentiles by PostgreSQL's `percentile_cont`, and on SQLite, which has
none, in one pass in Python with the same definition (linear interpolation), so both
give the same numbers.

Windows are half-open `[since, until)`: a proposal counts by its decision time, a run
by the time it started, a rollback by the time it was decided, an approval by the time
the action was proposed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Float,
    and_,
    case,
    cast,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.exc import SQLAlchemyError

from opsgate.store.sql import SqlStore
from opsgate.store.tables import actions, decisions, executions, segments
from opsgate.store.track_summary import NONE_LABEL, as_utc, decision_codes

# Every figure can be cut by these (the `--by` and `--where` keys).
SEGMENTS: dict[str, Any] = {
    "severity": segments.c.severity,
    "incident_class": segments.c.incident_class,
    "tier": segments.c.tier,
    "environment": segments.c.environment,
    "action": segments.c.action,
    "proposer_kind": segments.c.proposer_kind,
}
CAUSES = (
    "stopped",
    "failed_verification",
    "timeout",
    "provider_errors",
    "runner_error",
    "manual",
)
ALL = "all"


@dataclass(frozen=True)
class Window:
    since: datetime
    until: datetime

    @property
    def length(self) -> timedelta:
        return self.until - self.since

    def previous(self) -> Window:
        """The window of the same length just before this one."""
        return Window(self.since - self.length, self.since)


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """PostgreSQL's percentile_cont: linear interpolation between closest ranks."""
    n = len(sorted_values)
    if n == 0:
        return None
    position = q * (n - 1)
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return float(sorted_values[low])
    fraction = position - low
    return float(sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction)


def _label(value: Any) -> str:
    return NONE_LABEL if value is None else str(value)


@dataclass
class VerificationRow:
    segment: str
    started: int = 0  # runs started in the window
    finished: int = 0  # of those, ended (the denominator of the pass rate)
    succeeded: int = 0
    causes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CAUSES, 0))
    in_progress: int = 0
    stop_conditions: dict[str, int] = field(default_factory=dict)

    @property
    def pass_rate(self) -> float | None:
        return self.succeeded / self.finished if self.finished else None

    @property
    def stop_rate(self) -> float | None:
        return self.causes["stopped"] / self.started if self.started else None


@dataclass
class RollbackRow:
    segment: str
    decided: int = 0
    verified: int = 0
    never_verified: int = 0  # rollback_failed or still rolling back: counted, not dropped
    p50: float | None = None
    p90: float | None = None
    max: float | None = None
    durations: list[float] = field(default_factory=list)
    failed: int = 0  # finished without the rollback verifying: rollback_failed
    automatic: int = 0  # decided by opsgate, not requested by someone


@dataclass
class BlockRow:
    segment: str
    phase: str
    decided: int = 0  # proposals (phase propose) or execution re-checks (phase execute)
    blocked: int = 0
    # A decision may carry several codes: `with_code` counts each blocked decision under
    # every code it carries (sums to more than `blocked`); `first_code` counts it once,
    # under its first code (sums to `blocked`).
    with_code: dict[str, int] = field(default_factory=dict)
    first_code: dict[str, int] = field(default_factory=dict)

    @property
    def block_rate(self) -> float | None:
        return self.blocked / self.decided if self.decided else None


@dataclass
class ApprovalRow:
    segment: str
    waited: int = 0  # actions that went to pending_approval
    approved: int = 0
    rejected: int = 0
    expired: int = 0  # expired before any final approval
    cancelled: int = 0
    pending: int = 0
    p50: float | None = None
    p90: float | None = None
    durations: list[float] = field(default_factory=list)

    @property
    def rejection_rate(self) -> float | None:
        return self.rejected / self.waited if self.waited else None

    @property
    def expiry_rate(self) -> float | None:
        return self.expired / self.waited if self.waited else None


Dims = tuple[str, ...]
SEGMENT_NAMES = tuple(SEGMENTS)


def by_keys(by: str | Sequence[str] | None) -> tuple[str, ...]:
    """`--by` as a tuple of segment names (empty: everything together)."""
    if by is None:
        return ()
    keys = (by,) if isinstance(by, str) else tuple(by)
    for key in keys:
        if key not in SEGMENTS:
            raise ValueError(f"unknown segment {key!r}; one of {', '.join(SEGMENTS)}")
    return keys


def segment_of(dims: Dims, keys: Sequence[str]) -> str:
    """The label of a cube cell under a cut: its values for `keys`, or `all`."""
    if not keys:
        return ALL
    return " ".join(dims[SEGMENT_NAMES.index(key)] for key in keys)


def rollup_verification(
    cube: Iterable[tuple[Dims, str | None, str | None, int]], keys: Sequence[str]
) -> list[VerificationRow]:
    rows: dict[str, VerificationRow] = {}
    for dims, outcome, trigger, n in cube:
        label = segment_of(dims, keys)
        row = rows.setdefault(label, VerificationRow(label))
        row.started += n
        if outcome is None:
            row.in_progress += n
            continue
        row.finished += n
        if outcome == "succeeded":
            row.succeeded += n
        else:
            row.causes[outcome] = row.causes.get(outcome, 0) + n
        if outcome == "stopped":
            name = _label(trigger)
            row.stop_conditions[name] = row.stop_conditions.get(name, 0) + n
    return sorted(rows.values(), key=lambda r: (-r.started, r.segment))


@dataclass
class BlocksCube:
    phase: str
    totals: list[tuple[Dims, int, int]] = field(default_factory=list)  # decided, blocked
    with_code: list[tuple[Dims, str, int]] = field(default_factory=list)
    first_code: list[tuple[Dims, str, int]] = field(default_factory=list)


def rollup_blocks(cube: BlocksCube, keys: Sequence[str]) -> list[BlockRow]:
    rows: dict[str, BlockRow] = {}
    for dims, decided, blocked in cube.totals:
        label = segment_of(dims, keys)
        row = rows.setdefault(label, BlockRow(label, cube.phase))
        row.decided += decided
        row.blocked += blocked
    for dims, code, n in cube.with_code:
        row = rows[segment_of(dims, keys)]
        row.with_code[code] = row.with_code.get(code, 0) + n
    for dims, code, n in cube.first_code:
        row = rows[segment_of(dims, keys)]
        row.first_code[code] = row.first_code.get(code, 0) + n
    return sorted(rows.values(), key=lambda r: (-r.decided, r.segment))


class ReportQueries:
    """Named aggregate queries; every method takes a window, a segment and filters.

    Facts carry their action's `segment_id` (one id per distinct severity, class, tier,
    environment, action and proposer kind), so the heavy queries group by one integer
    read from a covering index; the small `segments` table gives the labels.
    """

    def __init__(
        self, store: SqlStore, conn: Connection | None = None, *, proposer: str | None = None
    ) -> None:
        self.store = store
        self.dialect = store.dialect
        self._labels: dict[int, Dims] = {}
        # A decision reads its proposer's track record inside its own transaction.
        self._conn = conn
        # Set when every query here is narrowed to one proposer (the track record): only
        # its segments need labels, not every proposer's.
        self._labels_of = proposer

    # --- helpers --------------------------------------------------------------------------

    def _rows(self, statement: Any) -> Sequence[Any]:
        try:
            if self._conn is not None:
                return self._conn.execute(statement).all()
            with self.store.engine.connect() as conn:
                return conn.execute(statement).all()
        except SQLAlchemyError as exc:
            raise self.store.store_error(exc) from None

    @staticmethod
    def _of_proposer(segment_id: Any, proposer: str | None) -> list[ColumnElement[bool]]:
        """Facts of one proposer's actions (the track record and `report proposers`): the
        proposer is part of the segment, so this is a few ids, not a set of its actions."""
        if proposer is None:
            return []
        return [segment_id.in_(select(segments.c.id).where(segments.c.proposer_id == proposer))]

    def _dims(self, segment_id: int | None) -> Dims:
        """The labels of a segment id (read once per report: a few rows per proposer)."""
        if segment_id not in self._labels:
            statement = select(segments.c.id, *SEGMENTS.values())
            if self._labels_of is not None:
                statement = statement.where(segments.c.proposer_id == self._labels_of)
                # A segment of someone else (a query not narrowed): every label from now on.
                self._labels_of = None
            rows = self._rows(statement)
            self._labels = {row[0]: tuple(v or NONE_LABEL for v in row[1:]) for row in rows}
        return self._labels.get(segment_id or -1, (NONE_LABEL,) * len(SEGMENTS))

    def segment_values(self, key: str) -> set[str]:
        """Every value segment `key` has had, as reports label it."""
        if key not in SEGMENTS:
            raise ValueError(f"unknown segment {key!r}; one of {', '.join(SEGMENTS)}")
        rows = self._rows(select(SEGMENTS[key]).distinct())
        return {row[0] or NONE_LABEL for row in rows}

    @staticmethod
    def _filters(column: Any, where: Mapping[str, str]) -> list[ColumnElement[bool]]:
        """`where` as `segment_id IN (matching segments)`."""
        if not where:
            return []
        clauses = []
        for key, value in where.items():
            if key not in SEGMENTS:
                raise ValueError(f"unknown filter {key!r}; one of {', '.join(SEGMENTS)}")
            clauses.append(SEGMENTS[key] == ("" if value == NONE_LABEL else value))
        return [column.in_(select(segments.c.id).where(*clauses))]

    def _seconds(self, later: Any, earlier: Any) -> Any:
        if self.dialect == "postgresql":
            return func.extract("epoch", later - earlier)
        # SQLite keeps these as UTC text; julianday reads it to ~10 µs here.
        return (func.julianday(later) - func.julianday(earlier)) * 86400.0

    # --- verification -------------------------------------------------------------------

    def verification_cube(
        self,
        window: Window,
        where: Mapping[str, str] | None = None,
        *,
        proposer: str | None = None,
    ) -> list[tuple[Dims, str | None, str | None, int]]:
        """Runs started in the window at the finest grain: (segment, outcome, trigger)
        -> n. Any cut or rollup is a sum in Python, so one query serves the report, its
        `--by` and the search for what moved."""
        e = executions
        statement = (
            select(e.c.segment_id, e.c.outcome, e.c.trigger_name, func.count())
            .where(
                e.c.run_started_at >= window.since,
                e.c.run_started_at < window.until,
                *self._filters(e.c.segment_id, where or {}),
                *self._of_proposer(e.c.segment_id, proposer),
            )
            .group_by(e.c.segment_id, e.c.outcome, e.c.trigger_name)
        )
        return [
            (self._dims(seg), outcome, trigger, int(n))
            for seg, outcome, trigger, n in self._rows(statement)
        ]

    def verification(
        self, window: Window, by: str | None = None, where: Mapping[str, str] | None = None
    ) -> list[VerificationRow]:
        """Pass rate of runs started in the window, the rest split by cause."""
        return rollup_verification(self.verification_cube(window, where), by_keys(by))

    def pass_rate_by_day(
        self, window: Window, where: Mapping[str, str] | None = None
    ) -> list[tuple[str, int, int]]:
        """(day, finished, succeeded) per UTC day of run start, for the trend chart."""
        e = executions
        if self.dialect == "postgresql":
            day: Any = func.to_char(func.timezone("UTC", e.c.run_started_at), "YYYY-MM-DD").label(
                "day"
            )
        else:
            day = func.substr(e.c.run_started_at, 1, 10).label("day")
        statement = (
            select(
                day,
                func.count(),
                func.sum(case((e.c.outcome == "succeeded", 1), else_=0)),
            )
            .where(
                e.c.run_started_at >= window.since,
                e.c.run_started_at < window.until,
                e.c.outcome.is_not(None),
                *self._filters(e.c.segment_id, where or {}),
            )
            .group_by(day)
            .order_by(day)
        )
        return [(str(d), int(f), int(s or 0)) for d, f, s in self._rows(statement)]

    # --- rollbacks ----------------------------------------------------------------------

    def _by_column(self, by: str | None) -> Any:
        if by is None:
            return literal(ALL)
        by_keys(by)
        return SEGMENTS[by]

    def _rollbacks_in(
        self,
        window: Window,
        where: Mapping[str, str] | None,
        *,
        manual: bool | None = None,
        proposer: str | None = None,
    ) -> list[ColumnElement[bool]]:
        """Rollbacks decided in the window (the filter every rollback figure uses)."""
        e = executions
        base = [
            e.c.rollback_decided_at >= window.since,
            e.c.rollback_decided_at < window.until,
            *self._filters(e.c.segment_id, where or {}),
            *self._of_proposer(e.c.segment_id, proposer),
        ]
        if manual is not None:
            requested = e.c.rollback_requested_by
            base.append(requested.is_not(None) if manual else requested.is_(None))
        return base

    @staticmethod
    def _rollback_counts() -> list[Any]:
        """decided, verified, failed (finished without verifying), automatic."""
        e = executions
        failed = and_(e.c.finished_at.is_not(None), e.c.rollback_verified_at.is_(None))
        return [
            func.count(),
            func.count(e.c.rollback_verified_at),
            func.sum(case((failed, 1), else_=0)),
            func.sum(case((e.c.rollback_requested_by.is_(None), 1), else_=0)),
        ]

    def rollbacks_cube(
        self, window: Window, *, proposer: str | None = None
    ) -> list[tuple[Dims, RollbackRow]]:
        """The rollback counts at the finest grain (segment), for cuts in Python: the
        same filter and counts as `rollbacks`, one query for every scope."""
        e = executions
        statement = (
            select(e.c.segment_id, *self._rollback_counts())
            .where(*self._rollbacks_in(window, None, proposer=proposer))
            .group_by(e.c.segment_id)
        )
        return [
            (
                self._dims(seg),
                RollbackRow(
                    ALL, int(d), int(v), int(d) - int(v), failed=int(f or 0), automatic=int(a or 0)
                ),
            )
            for seg, d, v, f, a in self._rows(statement)
        ]

    def rollbacks(
        self,
        window: Window,
        by: str | None = None,
        where: Mapping[str, str] | None = None,
        *,
        keep_durations: bool = False,
        manual: bool | None = None,
        proposer: str | None = None,
        counts_only: bool = False,
    ) -> list[RollbackRow]:
        """Rollback time (decision -> rollback verified): p50, p90, max per segment; only
        manual ones (someone ran `opsgate rollback`) or only automatic ones if asked."""
        e = executions
        segment = self._by_column(by).label("segment")
        duration = self._seconds(e.c.rollback_verified_at, e.c.rollback_decided_at)
        joined = e.join(segments, segments.c.id == e.c.segment_id) if by else e
        base = self._rollbacks_in(window, where, manual=manual, proposer=proposer)
        counts = (
            select(segment, *self._rollback_counts())
            .select_from(joined)
            .where(*base)
            .group_by(segment)
        )
        rows = {
            _label(seg or None): RollbackRow(
                _label(seg or None),
                int(d),
                int(v),
                int(d) - int(v),
                failed=int(f or 0),
                automatic=int(auto or 0),
            )
            for seg, d, v, f, auto in self._rows(counts)
        }
        if counts_only:
            return sorted(rows.values(), key=lambda r: (-r.decided, r.segment))
        verified = [*base, e.c.rollback_verified_at.is_not(None)]
        if self.dialect == "postgresql" and not keep_durations:
            stats = (
                select(
                    segment,
                    func.percentile_cont(0.5).within_group(cast(duration, Float)),
                    func.percentile_cont(0.9).within_group(cast(duration, Float)),
                    func.max(duration),
                )
                .select_from(joined)
                .where(*verified)
                .group_by(segment)
            )
            for seg, p50, p90, top in self._rows(stats):
                row = rows[_label(seg or None)]
                row.p50, row.p90, row.max = float(p50), float(p90), float(top)
        else:
            grouped: dict[str, list[float]] = defaultdict(list)
            ordered = (
                select(segment, duration)
                .select_from(joined)
                .where(*verified)
                .order_by(segment, duration)
            )
            for seg, seconds in self._rows(ordered):
                grouped[_label(seg or None)].append(float(seconds))
            for name, values in grouped.items():
                row = rows[name]
                row.p50, row.p90 = percentile(values, 0.5), percentile(values, 0.9)
                row.max = values[-1]
                if keep_durations:
                    row.durations = values
        return sorted(rows.values(), key=lambda r: (-r.decided, r.segment))

    # --- policy blocks ------------------------------------------------------------------

    def blocks_cube(
        self,
        window: Window,
        where: Mapping[str, str] | None = None,
        *,
        phase: str = "propose",
        proposer: str | None = None,
    ) -> BlocksCube:
        """Decisions at `phase` in the window at the finest grain, with their deny codes."""
        d = decisions
        base = [
            d.c.phase == phase,
            d.c.decided_at >= window.since,
            d.c.decided_at < window.until,
            *self._filters(d.c.segment_id, where or {}),
            *self._of_proposer(d.c.segment_id, proposer),
        ]
        # One pass over the covering index: totals, first codes and codes per decision,
        # from the few distinct code lists (parsed once per list, not once per row).
        grain = (
            select(d.c.segment_id, d.c.allow, d.c.deny_key, func.count())
            .where(*base)
            .group_by(d.c.segment_id, d.c.allow, d.c.deny_key)
        )
        cube = BlocksCube(phase)
        totals: dict[Dims, list[int]] = defaultdict(lambda: [0, 0])
        first: dict[tuple[Dims, str], int] = defaultdict(int)
        carried: dict[tuple[Dims, str], int] = defaultdict(int)
        parsed: dict[str | None, list[str]] = {}
        for seg, allow, key, n in self._rows(grain):
            dims = self._dims(seg)
            totals[dims][0] += int(n)
            if allow:
                continue
            totals[dims][1] += int(n)
            if key not in parsed:
                parsed[key] = decision_codes(key)
            codes = parsed[key]
            first[(dims, codes[0] if codes else NONE_LABEL)] += int(n)
            for code in dict.fromkeys(codes):
                carried[(dims, code)] += int(n)
        cube.totals = [(dims, t[0], t[1]) for dims, t in totals.items()]
        cube.first_code = [(dims, code, n) for (dims, code), n in first.items()]
        cube.with_code = [(dims, code, n) for (dims, code), n in carried.items()]
        return cube

    def blocks(
        self,
        window: Window,
        by: str | None = None,
        where: Mapping[str, str] | None = None,
        *,
        phase: str = "propose",
    ) -> list[BlockRow]:
        """Blocked / decided at `phase` (propose or execute), by deny code both ways."""
        return rollup_blocks(self.blocks_cube(window, where, phase=phase), by_keys(by))

    # --- approvals ----------------------------------------------------------------------

    def _approvals_in(
        self, window: Window, where: Mapping[str, str] | None, proposer: str | None
    ) -> list[ColumnElement[bool]]:
        """Actions proposed in the window that were not blocked (every approval figure)."""
        a = actions
        return [
            a.c.created_at >= window.since,
            a.c.created_at < window.until,
            a.c.state != "blocked",
            *self._filters(a.c.segment_id, where or {}),
            *self._of_proposer(a.c.segment_id, proposer),
        ]

    @staticmethod
    def _approval_counts() -> list[Any]:
        """waited, approved, rejected, expired and cancelled unapproved, pending."""
        a = actions
        unapproved = a.c.approved_at.is_(None)
        return [
            func.count(),
            func.count(a.c.approved_at),
            func.sum(case((a.c.state == "rejected", 1), else_=0)),
            func.sum(case((and_(a.c.state == "expired", unapproved), 1), else_=0)),
            func.sum(case((and_(a.c.state == "cancelled", unapproved), 1), else_=0)),
            func.sum(case((a.c.state == "pending_approval", 1), else_=0)),
        ]

    def approvals_cube(
        self, window: Window, *, proposer: str | None = None
    ) -> list[tuple[Dims, ApprovalRow]]:
        """The approval counts at the finest grain (segment), for cuts in Python: the
        same filter and counts as `approvals`, one query for every scope."""
        a = actions
        statement = (
            select(a.c.segment_id, *self._approval_counts())
            .where(*self._approvals_in(window, None, proposer))
            .group_by(a.c.segment_id)
        )
        return [
            (
                self._dims(seg),
                ApprovalRow(
                    ALL, int(w), int(a), int(r or 0), int(e or 0), int(c or 0), int(p or 0)
                ),
            )
            for seg, w, a, r, e, c, p in self._rows(statement)
        ]

    def approvals(
        self,
        window: Window,
        by: str | None = None,
        where: Mapping[str, str] | None = None,
        *,
        proposer: str | None = None,
        counts_only: bool = False,
    ) -> list[ApprovalRow]:
        """Time to approval p50/p90 and what became of actions that waited for approval."""
        a = actions
        segment = self._by_column(by).label("segment")
        joined = a.join(segments, segments.c.id == a.c.segment_id) if by else a
        base = self._approvals_in(window, where, proposer)
        counts = (
            select(segment, *self._approval_counts())
            .select_from(joined)
            .where(*base)
            .group_by(segment)
        )
        rows: dict[str, ApprovalRow] = {}
        for seg, waited, approved, rejected, expired, cancelled, pending in self._rows(counts):
            label = _label(seg or None)
            rows[label] = ApprovalRow(
                label,
                int(waited),
                int(approved),
                int(rejected or 0),
                int(expired or 0),
                int(cancelled or 0),
                int(pending or 0),
            )
        if counts_only:
            return sorted(rows.values(), key=lambda r: (-r.waited, r.segment))
        wait = self._seconds(a.c.approved_at, a.c.created_at)
        approved_only = [*base, a.c.approved_at.is_not(None)]
        if self.dialect == "postgresql":
            stats = (
                select(
                    segment,
                    func.percentile_cont(0.5).within_group(cast(wait, Float)),
                    func.percentile_cont(0.9).within_group(cast(wait, Float)),
                )
                .select_from(joined)
                .where(*approved_only)
                .group_by(segment)
            )
            for seg, p50, p90 in self._rows(stats):
                row = rows[_label(seg or None)]
                row.p50, row.p90 = float(p50), float(p90)
        else:
            grouped: dict[str, list[float]] = defaultdict(list)
            ordered = (
                select(segment, wait)
                .select_from(joined)
                .where(*approved_only)
                .order_by(segment, wait)
            )
            for seg, seconds in self._rows(ordered):
                grouped[_label(seg or None)].append(float(seconds))
            for name, values in grouped.items():
                rows[name].p50, rows[name].p90 = percentile(values, 0.5), percentile(values, 0.9)
        return sorted(rows.values(), key=lambda r: (-r.waited, r.segment))

    def shadow(
        self, window: Window, where: Mapping[str, str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Per phase: decisions the shadow bundle also judged, and where it disagreed
        ("would have blocked" / "would have allowed"), by the shadow's deny codes."""
        d = decisions
        statement = select(d.c.phase, d.c.allow, d.c.shadow).where(
            d.c.decided_at >= window.since,
            d.c.decided_at < window.until,
            d.c.shadow.is_not(None),
            *self._filters(d.c.segment_id, where or {}),
        )
        out: dict[str, dict[str, Any]] = {}
        for phase, allow, verdict in self._rows(statement):
            row = out.setdefault(
                phase,
                {"evaluated": 0, "would_block": 0, "would_allow": 0, "codes": defaultdict(int)},
            )
            row["evaluated"] += 1
            shadow_allows = bool(verdict.get("allow")) if isinstance(verdict, Mapping) else False
            if allow and not shadow_allows:
                row["would_block"] += 1
                for deny in verdict.get("deny", []) if isinstance(verdict, Mapping) else []:
                    row["codes"][str(deny.get("code"))] += 1
            elif not allow and shadow_allows:
                row["would_allow"] += 1
        return out

    def count_actions(self) -> int:
        """A bare count over the actions table: the yardstick in bench/report.py."""
        return int(self._rows(select(func.count()).select_from(actions))[0][0])

    # --- run history (the track record) -------------------------------------------------

    def run_history(
        self, proposer: str, until: datetime | None = None
    ) -> list[tuple[Dims, RunHistory]]:
        """Per segment, over all time before `until`: when the proposer's last run
        finished, and its last failed or rolled-back run, last rollback, last failed
        rollback."""
        e = executions
        rolled_back = e.c.rollback_decided_at.is_not(None)
        bad = or_(e.c.outcome != "succeeded", rolled_back)
        rollback_failed = and_(rolled_back, e.c.rollback_verified_at.is_(None))
        statement = (
            select(
                e.c.segment_id,
                func.max(e.c.finished_at),
                func.max(case((bad, e.c.finished_at))),
                func.max(case((rolled_back, e.c.finished_at))),
                func.max(case((rollback_failed, e.c.finished_at))),
            )
            .where(
                e.c.finished_at.is_not(None),
                *([e.c.finished_at < until] if until is not None else []),
                *self._of_proposer(e.c.segment_id, proposer),
            )
            .group_by(e.c.segment_id)
        )
        return [
            (self._dims(seg), RunHistory(*(as_utc(v) for v in values)))
            for seg, *values in self._rows(statement)
        ]


@dataclass(frozen=True)
class RunHistory:
    last_finished: datetime | None = None
    last_failed_or_rolled_back: datetime | None = None
    last_rolled_back: datetime | None = None
    last_rollback_failed: datetime | None = None


def proposers_in(
    q: ReportQueries, window: Window, kind: str | None = None
) -> list[tuple[str, str]]:
    """(id, kind) of everyone who proposed in the window, by id."""
    a = actions
    statement = (
        select(a.c.proposer_id, a.c.proposer_kind)
        .where(a.c.created_at >= window.since, a.c.created_at < window.until)
        .distinct()
        .order_by(a.c.proposer_id, a.c.proposer_kind)
    )
    if kind is not None:
        statement = statement.where(a.c.proposer_kind == kind)
    return [(str(p), str(k)) for p, k in q._rows(statement)]
