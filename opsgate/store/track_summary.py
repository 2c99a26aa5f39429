"""The track record's summary: what a decision reads about its proposer, kept as it happens.

A proposer's track record is read inside every decision. Counted from the facts (the
reports' queries, opsgate.reports.queries) it costs a scan of the proposer's history: about
100 ms at 100,000 actions. So the SQL store also keeps, per proposer, action type,
environment and UTC day, the counts the record is made of (`track_record_days`) and, per
proposer, action type and environment, when its runs last ended and how
(`track_record_latest`). Each row is kept at three levels, so a decision reads three short
ranges, not every type and environment the proposer ever touched:

    (proposer, '', '')                  -> the record's `overall` scope
    (proposer, action type, '')         -> `action_type`
    (proposer, action type, environment) -> `action_type_in_environment`

How a fact counts is defined once, here, as plain functions of a row's columns
(`action_counts`, `decision_counts`, `execution_counts`, `execution_latest`), with the
reports' filters: a transaction that writes a fact adds the difference between the row's
counts after and before, and the store writes the sum as it commits, in that transaction
(`SqlTx.write_track_summary`). `rebuild` recounts every row with the same functions (the
migration's backfill). tests/unit/test_track_summary.py holds the summary to the reports'
own queries over random histories, row changes and retractions included.

The record's window is whole UTC days: everything recorded since midnight UTC, N - 1 days
before today (N: OPSGATE_TRACK_RECORD_WINDOW, rounded up to days).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

COUNTERS = (
    "proposals",
    "blocked",
    "approved",
    "rejected",
    "executed",
    "finished",
    "verified_passes",
    "failed_verifications",
    "stop_conditions",
    "automatic_rollbacks",
    "rollbacks_failed",
)
# Every count is kept twice: in a row of its day and in a row of its block of BLOCK days,
# so a 90-day window reads about a dozen rows per level and code instead of 90: the blocks
# from the first one that starts inside the window, and single days before that.
BLOCK = 16
# A blocked proposal's codes are rows of their own: (..., span, day, code) -> with_code.
WITH_CODE = "with_code"
LATEST = ("last_finished", "last_failed_or_rolled_back", "last_rolled_back", "last_rollback_failed")
NONE_LABEL = "(none)"  # how reports label a value that was not given
ANY = ""  # the level's wildcard: action types and environments are never empty

Who = tuple[str, str, str]  # proposer id, action type, environment
# (day, code, counter) -> n; code is '' except for WITH_CODE
Counts = dict[tuple[int, str, str], int]
Latest = tuple[datetime | None, datetime | None, datetime | None, datetime | None]
NO_LATEST: Latest = (None, None, None, None)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def day_of(at: datetime) -> int:
    """The UTC day an instant falls on, as days since 1970-01-01."""
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return (at - _EPOCH).days


def day_start(day: int) -> datetime:
    return _EPOCH + timedelta(days=day)


def window_days(seconds: float) -> int:
    """A window's length in whole days (at least one)."""
    whole, part = divmod(max(seconds, 0.0), 86400.0)
    return max(int(whole) + (1 if part else 0), 1)


def window_start(now: datetime, days: int) -> datetime:
    """Midnight UTC, `days - 1` days before `now`'s day: the first instant a record counts."""
    return day_start(day_of(now) - days + 1)


def levels(who: Who) -> tuple[Who, Who, Who]:
    return (who[0], ANY, ANY), (who[0], who[1], ANY), who


def _value(v: Any) -> Any:
    return getattr(v, "value", v)  # an enum member or its stored text


def action_counts(created_at: datetime, state: Any, approved_at: datetime | None) -> Counts:
    """Approvals, as `ReportQueries._approvals_in` / `_approval_counts` count them: actions
    proposed on the day and not blocked, approved (ever) or rejected."""
    state = _value(state)
    if state == "blocked":
        return {}
    day = day_of(created_at)
    counts: Counts = {}
    if approved_at is not None:
        counts[(day, "", "approved")] = 1
    if state == "rejected":
        counts[(day, "", "rejected")] = 1
    return counts


def decision_codes(deny_key: str | None) -> list[str]:
    """The deny codes of a decision's `deny_key`, as the blocks report reads them."""
    if not deny_key:
        return []
    try:
        codes = json.loads(deny_key)
    except ValueError:
        return [NONE_LABEL]
    return [str(c) for c in codes] if isinstance(codes, list) else [NONE_LABEL]


def decision_counts(phase: str, decided_at: datetime, allow: bool, deny_key: str | None) -> Counts:
    """Proposals and blocks, as `ReportQueries.blocks_cube` counts them (phase propose)."""
    if phase != "propose":
        return {}
    day = day_of(decided_at)
    counts: Counts = {(day, "", "proposals"): 1}
    if not allow:
        counts[(day, "", "blocked")] = 1
        for code in dict.fromkeys(decision_codes(deny_key)):
            counts[(day, code, WITH_CODE)] = 1
    return counts


def execution_counts(
    run_started_at: datetime | None,
    outcome: Any,
    rollback_decided_at: datetime | None,
    rollback_requested_by: str | None,
    finished_at: datetime | None,
    rollback_verified_at: datetime | None,
) -> Counts:
    """Runs by the day they started (`verification_cube` + `rollup_verification`) and
    rollbacks by the day they were decided (`_rollbacks_in` + `_rollback_counts`)."""
    counts: Counts = {}
    outcome = _value(outcome)
    if run_started_at is not None:
        day = day_of(run_started_at)
        counts[(day, "", "executed")] = 1
        if outcome is not None:
            counts[(day, "", "finished")] = 1
            if outcome == "succeeded":
                counts[(day, "", "verified_passes")] = 1
            elif outcome == "failed_verification":
                counts[(day, "", "failed_verifications")] = 1
            elif outcome == "stopped":
                counts[(day, "", "stop_conditions")] = 1
    if rollback_decided_at is not None:
        day = day_of(rollback_decided_at)
        if rollback_requested_by is None:
            counts[(day, "", "automatic_rollbacks")] = 1
        if finished_at is not None and rollback_verified_at is None:
            counts[(day, "", "rollbacks_failed")] = 1
    return counts


def execution_latest(
    finished_at: datetime | None,
    outcome: Any,
    rollback_decided_at: datetime | None,
    rollback_verified_at: datetime | None,
) -> Latest:
    """What a run adds to the run history (`ReportQueries.run_history`): its end, as a
    candidate for each 'last ...' it qualifies for."""
    if finished_at is None:
        return NO_LATEST
    outcome = _value(outcome)
    rolled_back = rollback_decided_at is not None
    bad = (outcome is not None and outcome != "succeeded") or rolled_back
    return (
        finished_at,
        finished_at if bad else None,
        finished_at if rolled_back else None,
        finished_at if rolled_back and rollback_verified_at is None else None,
    )


def action_row_counts(row: Mapping[str, Any]) -> Counts:
    return action_counts(row["created_at"], row["state"], row["approved_at"])


def execution_row_counts(row: Mapping[str, Any]) -> Counts:
    return execution_counts(
        row["run_started_at"],
        row["outcome"],
        row["rollback_decided_at"],
        row["rollback_requested_by"],
        row["finished_at"],
        row["rollback_verified_at"],
    )


def execution_row_latest(row: Mapping[str, Any]) -> Latest:
    return execution_latest(
        row["finished_at"], row["outcome"], row["rollback_decided_at"], row["rollback_verified_at"]
    )


def as_utc(value: Any) -> datetime | None:
    """A stored or aggregated timestamp: SQLite hands back its text, PostgreSQL a datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def later_of(known: Sequence[Any], new: Sequence[Any]) -> Latest:
    """Each 'last ...' the later of the two (None: not yet)."""
    out = []
    for a, b in zip(known, new, strict=True):
        a, b = as_utc(a), as_utc(b)
        out.append(b if a is None else a if b is None else max(a, b))
    return tuple(out)  # type: ignore[return-value]


@dataclass
class SummaryChanges:
    """What a transaction changes in the summary, written as it commits."""

    # (level, span, first day of the span, code) -> counter -> delta
    days: dict[tuple[Who, int, int, str], dict[str, int]] = field(default_factory=dict)
    latest: dict[Who, Latest] = field(default_factory=dict)
    # A run that no longer qualifies for a 'last ...' it was counted for (a finished run
    # being rolled back by hand is unfinished again): a maximum cannot be taken back,
    # so these are counted again from the runs.
    recount: set[Who] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.days or self.latest or self.recount)

    def count(self, who: Who, before: Counts, after: Counts) -> None:
        for key in before.keys() | after.keys():
            delta = after.get(key, 0) - before.get(key, 0)
            if not delta:
                continue
            day, code, counter = key
            for level in levels(who):
                for span, first in ((1, day), (BLOCK, day - day % BLOCK)):
                    row = self.days.setdefault((level, span, first, code), {})
                    row[counter] = row.get(counter, 0) + delta

    def run_ended(self, who: Who, before: Latest, after: Latest) -> None:
        if any(
            old is not None and (new is None or new < old)
            for old, new in zip(before, after, strict=True)
        ):
            self.recount.update(levels(who))
        if after == NO_LATEST:
            return
        for level in levels(who):
            self.latest[level] = later_of(self.latest.get(level, NO_LATEST), after)

    def day_rows(self) -> list[dict[str, Any]]:
        """Upsert parameters in key order (rows are locked in one order: no deadlock)."""
        out = []
        for (who, span, day, code), deltas in sorted(self.days.items()):
            values = {name: deltas.get(name, 0) for name in (*COUNTERS, WITH_CODE)}
            if not any(values.values()):
                continue
            out.append(
                {
                    "proposer_id": who[0],
                    "action_type": who[1],
                    "environment": who[2],
                    "span": span,
                    "day": day,
                    "code": code,
                    **values,
                }
            )
        return out

    def latest_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "proposer_id": who[0],
                "action_type": who[1],
                "environment": who[2],
                **dict(zip(LATEST, values, strict=True)),
            }
            for who, values in sorted(self.latest.items())
            if who not in self.recount
        ]


def latest_by_level(
    runs: Iterable[tuple[Who, Latest]], wanted: Iterable[Who] | None = None
) -> dict[Who, Latest]:
    """Run histories per run, folded into the three levels (only `wanted` ones if given)."""
    keep = set(wanted) if wanted is not None else None
    out: dict[Who, Latest] = {}
    for who, values in runs:
        for level in levels(who):
            if keep is None or level in keep:
                out[level] = later_of(out.get(level, NO_LATEST), values)
    return out


def rebuilt(
    actions: Iterable[Mapping[str, Any]],
    decisions: Iterable[Mapping[str, Any]],
    executions: Iterable[Mapping[str, Any]],
) -> SummaryChanges:
    """The whole summary counted again from the rows (the migration's backfill).

    `actions` rows need id, proposer_id, action_type, environment, created_at, state and
    approved_at; decisions and executions rows are only counted when their action is known,
    as reports only count rows with a segment."""
    changes = SummaryChanges()
    who_of: dict[str, Who] = {}
    for row in actions:
        who = (row["proposer_id"], row["action_type"], row["environment"])
        who_of[row["id"]] = who
        changes.count(who, {}, action_row_counts(row))
    for row in decisions:
        who_or_none = who_of.get(row["action_id"])
        if who_or_none is not None:
            counts = decision_counts(
                row["phase"], row["decided_at"], bool(row["allow"]), row["deny_key"]
            )
            changes.count(who_or_none, {}, counts)
    latest: list[tuple[Who, Latest]] = []
    for row in executions:
        who_or_none = who_of.get(row["action_id"])
        if who_or_none is not None:
            changes.count(who_or_none, {}, execution_row_counts(row))
            latest.append((who_or_none, execution_row_latest(row)))
    changes.latest = latest_by_level(latest)
    return changes


def first_block(since_day: int) -> int:
    """The first block that starts on or after `since_day`."""
    return since_day + (-since_day) % BLOCK


def merged_days(
    rows: Iterable[Mapping[str, Any]],
) -> dict[tuple[Who, int, int, str], dict[str, int]]:
    """Rows of `track_record_days` (or day_rows()) as one sum per key, zeros dropped: what
    a test compares."""
    out: dict[tuple[Who, int, int, str], dict[str, int]] = defaultdict(dict)
    for row in rows:
        who = (row["proposer_id"], row["action_type"], row["environment"])
        key = (who, row["span"], row["day"], row["code"])
        for name in (*COUNTERS, WITH_CODE):
            n = int(row[name] or 0)
            if n:
                out[key][name] = out[key].get(name, 0) + n
    return {key: values for key, values in out.items() if values}
