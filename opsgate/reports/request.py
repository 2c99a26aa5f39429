"""What `opsgate report` asks for and the report it names: built by the CLI and the server
alike, so both refuse the same bad options with the same words."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from opsgate.errors import InvalidInput, did_you_mean
from opsgate.models import parse_duration
from opsgate.reports.build import (
    BUILDERS,
    DEFAULT_MIN_RUNS,
    Report,
    rollbacks_report,
    summary_report,
    verification_report,
)
from opsgate.reports.queries import SEGMENTS, ReportQueries, Window
from opsgate.store.sql import SqlStore

if TYPE_CHECKING:
    from opsgate.gate import Gate

KINDS = ("summary", *BUILDERS, "proposers")
PROPOSER_KINDS = ("agent", "human")
# Reports whose figures rest on runs, and so say when there are too few to judge.
JUDGED = {"verification": verification_report, "rollbacks": rollbacks_report}


def parse_moment(value: str, field: str, now: datetime) -> datetime:
    """`90d` (that long ago), or an RFC 3339 date/time (UTC when no offset is given)."""
    try:
        return now - timedelta(seconds=parse_duration(value))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(
            field, f"expected a duration like 90d or a date, got {value!r}"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_where(pairs: tuple[str, ...]) -> dict[str, str]:
    where: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in SEGMENTS:
            hint = did_you_mean(key, SEGMENTS) if sep else ""
            raise InvalidInput(
                "--where", f"expected one of {', '.join(SEGMENTS)}=VALUE, got {pair!r}{hint}"
            )
        where[key] = value
    return where


def check_where_values(queries: ReportQueries, where: dict[str, str]) -> None:
    """A value no action ever had is a typo, not a segment with zero of everything."""
    for key, value in where.items():
        known = queries.segment_values(key)
        if value not in known:
            listed = ", ".join(sorted(known)[:20]) or "none yet"
            raise InvalidInput(
                "--where",
                f"no action has ever had {key}={value!r}{did_you_mean(value, known)} "
                f"(known: {listed})",
            )


@dataclass(frozen=True)
class ReportRequest:
    """What `opsgate report` asks for, as typed: built here or by the server alike."""

    kind: str = "summary"
    since: str | None = None
    until: str | None = None
    by: str | None = None
    where: tuple[str, ...] = ()
    min_runs: int = DEFAULT_MIN_RUNS
    table: str | None = None
    proposer_kind: str | None = None  # `proposers` only: agent or human


def build_report(
    store: SqlStore, request: ReportRequest, now: datetime, *, gate: Gate | None = None
) -> Report:
    """The report a request names; InvalidInput naming the option for anything wrong.

    `gate`: asked for each proposer's trust-ladder rung in `proposers`; None leaves the
    rungs out.
    """
    kind, by, min_runs, table_name = request.kind, request.by, request.min_runs, request.table
    if kind not in KINDS:
        raise InvalidInput("kind", f"expected one of {', '.join(KINDS)}")
    if by is not None and by not in (*SEGMENTS, "code"):
        raise InvalidInput("--by", f"expected one of {', '.join([*SEGMENTS, 'code'])}")
    if not 1 <= min_runs <= 1_000_000:
        raise InvalidInput("--min-runs", "expected 1 to 1000000")
    end = parse_moment(request.until, "--until", now) if request.until else now
    start = (
        parse_moment(request.since, "--since", now) if request.since else end - timedelta(days=30)
    )
    if start >= end:
        raise InvalidInput("--since", "must be before --until")
    if by == "code" and kind != "blocks":
        raise InvalidInput("--by", "code applies to `opsgate report blocks` only")
    if kind == "proposers" and by not in (None, "action"):
        raise InvalidInput("--by", "`opsgate report proposers` is cut by action only")
    proposer_kind = request.proposer_kind
    if proposer_kind is not None:
        if kind != "proposers":
            raise InvalidInput("--kind", "applies to `opsgate report proposers` only")
        if proposer_kind not in PROPOSER_KINDS:
            raise InvalidInput("--kind", f"expected one of {', '.join(PROPOSER_KINDS)}")
    where = parse_where(request.where)
    queries = ReportQueries(store)
    check_where_values(queries, where)
    window = Window(start, end)
    if kind == "summary":
        built = summary_report(queries, window, where, min_runs=min_runs)
    elif kind == "proposers":
        from opsgate.reports.proposers import RungOf, proposers_report

        rung_of: RungOf | None = None
        if gate is not None:
            from opsgate.trust import rung_today

            judge = gate

            def rung_of(proposer: str, who: str, action: str, environment: str) -> str | None:
                return rung_today(judge, proposer, who, action, environment, end)

        built = proposers_report(
            queries, window, by, where, kind=proposer_kind, min_runs=min_runs, rung_of=rung_of
        )
    elif kind in JUDGED:
        built = JUDGED[kind](queries, window, by, where, min_runs=min_runs)
    else:
        built = BUILDERS[kind](queries, window, None if by == "code" else by, where)
        if by == "code":
            built.by = "code"
    if table_name is not None:
        names = [t.name for t in built.tables]
        if table_name not in names:
            raise InvalidInput(
                "--table",
                f"no table {table_name!r} in this report{did_you_mean(table_name, names)} "
                f"(tables: {', '.join(names)})",
            )
        built.tables = [t for t in built.tables if t.name == table_name]
    return built
