"""The track record's summary in SQL: the statements that keep it and the one that reads it.

What counts is defined in opsgate/store/track_summary.py; this module only moves its
numbers in and out of `track_record_days` and `track_record_latest`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Integer,
    and_,
    bindparam,
    cast,
    delete,
    func,
    literal,
    null,
    or_,
    select,
    union_all,
)

from opsgate.store.tables import (
    UTCDateTime,
    actions,
    decisions,
    executions,
    track_record_days,
    track_record_latest,
)
from opsgate.store.track_summary import (
    ANY,
    BLOCK,
    COUNTERS,
    LATEST,
    NO_LATEST,
    WITH_CODE,
    Latest,
    SummaryChanges,
    Who,
    day_of,
    execution_row_latest,
    first_block,
    later_of,
    latest_by_level,
    rebuilt,
)

_KEY = ("proposer_id", "action_type", "environment")
_DAY_KEY = (*_KEY, "span", "day", "code")
_NUMBERS = (*COUNTERS, WITH_CODE)
_PAGE = 5_000


@functools.cache
def _statements(dialect_name: str) -> tuple[Any, Any, Any]:
    """Add to day rows; take the later of each 'last ...'; overwrite 'last ...' rows."""
    dialect: Any = importlib.import_module(f"sqlalchemy.dialects.{dialect_name}")
    d, t = track_record_days, track_record_latest
    add = dialect.insert(d)
    add = add.on_conflict_do_update(
        index_elements=[d.c[name] for name in _DAY_KEY],
        set_={name: d.c[name] + add.excluded[name] for name in _NUMBERS},
    )
    # GREATEST skips NULLs on PostgreSQL; SQLite's max() of NULL is NULL, hence coalesce.
    greatest = func.greatest if dialect_name == "postgresql" else func.max
    later = dialect.insert(t)
    later = later.on_conflict_do_update(
        index_elements=[t.c[name] for name in _KEY],
        set_={
            name: greatest(
                func.coalesce(t.c[name], later.excluded[name]),
                func.coalesce(later.excluded[name], t.c[name]),
            )
            for name in LATEST
        },
    )
    overwrite = dialect.insert(t)
    overwrite = overwrite.on_conflict_do_update(
        index_elements=[t.c[name] for name in _KEY],
        set_={name: overwrite.excluded[name] for name in LATEST},
    )
    return add, later, overwrite


def _levels_filter(table: Any) -> list[Any]:
    return [
        table.c.proposer_id == bindparam("proposer_id"),
        table.c.action_type.in_([literal(ANY), bindparam("action_type")]),
        table.c.environment.in_([literal(ANY), bindparam("environment")]),
    ]


# One statement, one round trip: the day sums (part 0) and the 'last ...' rows (part 1)
# as one union, each padded with typed NULLs where the other has columns.
_READ_DAYS = (
    select(
        literal(0).label("part"),
        track_record_days.c.action_type,
        track_record_days.c.environment,
        track_record_days.c.code,
        *(func.sum(track_record_days.c[name]) for name in _NUMBERS),
        *(cast(null(), UTCDateTime) for _ in LATEST),
    )
    .where(
        *_levels_filter(track_record_days),
        or_(
            and_(
                track_record_days.c.span == 1,
                track_record_days.c.day >= bindparam("since_day"),
                track_record_days.c.day < bindparam("first_block"),
            ),
            and_(
                track_record_days.c.span == BLOCK,
                track_record_days.c.day >= bindparam("first_block"),
            ),
        ),
    )
    .group_by(
        track_record_days.c.action_type,
        track_record_days.c.environment,
        track_record_days.c.code,
    )
)
_READ_LATEST = select(
    literal(1),
    track_record_latest.c.action_type,
    track_record_latest.c.environment,
    literal(ANY),
    *(cast(null(), Integer) for _ in _NUMBERS),
    *(track_record_latest.c[name] for name in LATEST),
).where(*_levels_filter(track_record_latest))
_READ = union_all(_READ_DAYS, _READ_LATEST)
_SUMS = slice(1, 4 + len(_NUMBERS))  # type, environment, code, sums
_LAST = slice(4 + len(_NUMBERS), None)

# A proposer's finished runs, for counting its 'last ...' again (see SummaryChanges.recount).
_RUNS_OF = (
    select(
        actions.c.action_type,
        actions.c.environment,
        executions.c.finished_at,
        executions.c.outcome,
        executions.c.rollback_decided_at,
        executions.c.rollback_verified_at,
    )
    .join(actions, actions.c.id == executions.c.action_id)
    .where(actions.c.proposer_id == bindparam("proposer_id"), executions.c.finished_at.is_not(None))
)
_LOCK_LATEST = (
    select(track_record_latest.c.proposer_id)
    .where(
        track_record_latest.c.proposer_id == bindparam("proposer_id"),
        track_record_latest.c.action_type == bindparam("action_type"),
        track_record_latest.c.environment == bindparam("environment"),
    )
    .with_for_update()
)


def write(conn: Connection, dialect_name: str, changes: SummaryChanges) -> None:
    """Apply a transaction's changes: day rows, then the 'last ...' rows, each in key order
    (every writer locks them in the same order: no deadlock between two)."""
    add, later, overwrite = _statements(dialect_name)
    rows = changes.day_rows()
    if rows:
        conn.execute(add, rows)
    latest = changes.latest_rows()
    if latest:
        conn.execute(later, latest)
    if changes.recount:
        recounted = recount(conn, dialect_name, sorted(changes.recount))
        conn.execute(overwrite, recounted)


def recount(
    conn: Connection, dialect_name: str, keys: list[Who], *, lock: bool = True
) -> list[dict[str, Any]]:
    """The 'last ...' of these keys counted again from the runs, after locking their rows
    (a concurrent run's end then waits, and takes the later of it and this count)."""
    if lock and dialect_name == "postgresql":
        for proposer, action_type, environment in keys:
            conn.execute(
                _LOCK_LATEST,
                {"proposer_id": proposer, "action_type": action_type, "environment": environment},
            )
    found: dict[Who, Latest] = {}
    for proposer in sorted({key[0] for key in keys}):
        runs = (
            ((proposer, row.action_type, row.environment), execution_row_latest(dict(row._mapping)))
            for row in conn.execute(_RUNS_OF, {"proposer_id": proposer})
        )
        found.update(latest_by_level(runs, keys))
    return [
        {
            **dict(zip(_KEY, key, strict=True)),
            **dict(zip(LATEST, found.get(key, NO_LATEST), strict=True)),
        }
        for key in keys
    ]


def read(
    conn: Connection,
    dialect_name: str,
    proposer_id: str,
    action_type: str,
    environment: str,
    since: datetime,
    pending: SummaryChanges | None = None,
) -> tuple[list[Any], list[Any]]:
    """The summary's rows for one proposer at the three levels: day sums since `since`
    (a UTC midnight) grouped by level and code, and the 'last ...' rows. `pending`: what
    the reading transaction changed and will write as it commits (a decision sees what
    its own transaction wrote)."""
    params = {"proposer_id": proposer_id, "action_type": action_type, "environment": environment}
    since_day = day_of(since)
    days: list[Any] = []
    latest: list[Any] = []
    row: Any
    for row in conn.execute(
        _READ, {**params, "since_day": since_day, "first_block": first_block(since_day)}
    ):
        if row[0] == 0:
            days.append(tuple(row[_SUMS]))
        else:
            latest.append((row[1], row[2], *row[_LAST]))
    if not pending:
        return days, latest
    wanted = {
        (proposer_id, ANY, ANY),
        (proposer_id, action_type, ANY),
        (proposer_id, action_type, environment),
    }
    for (who, span, day, code), deltas in pending.days.items():
        if who in wanted and span == 1 and day >= since_day:
            days.append((who[1], who[2], code, *(deltas.get(name, 0) for name in _NUMBERS)))
    recount_here = sorted(wanted & pending.recount)
    merged: dict[tuple[str, str], Latest] = {(row[0], row[1]): tuple(row[2:]) for row in latest}
    for who, values in pending.latest.items():
        if who in wanted:
            merged[(who[1], who[2])] = later_of(merged.get((who[1], who[2]), NO_LATEST), values)
    if recount_here:
        for recounted in recount(conn, dialect_name, recount_here, lock=False):
            merged[(recounted["action_type"], recounted["environment"])] = tuple(
                recounted[name] for name in LATEST
            )
    return days, [(key[0], key[1], *values) for key, values in merged.items()]


def _paged(conn: Connection, statement: Any, key: Any) -> Iterator[dict[str, Any]]:
    """Every row of `statement`, a page at a time (ordered by the unique `key`)."""
    after: Any = None
    while True:
        page = statement.order_by(key).limit(_PAGE)
        if after is not None:
            page = page.where(key > after)
        rows = [dict(row._mapping) for row in conn.execute(page)]
        yield from rows
        if len(rows) < _PAGE:
            return
        after = rows[-1][key.name]


def rebuild(conn: Connection, dialect_name: str) -> int:
    """Count the whole summary again from the facts (the migration's backfill; also after
    a bulk load that went around the store). Returns the day rows written."""
    conn.execute(delete(track_record_days))
    conn.execute(delete(track_record_latest))
    a, d, e = actions, decisions, executions
    changes = rebuilt(
        _paged(
            conn,
            select(
                a.c.id,
                a.c.proposer_id,
                a.c.action_type,
                a.c.environment,
                a.c.created_at,
                a.c.state,
                a.c.approved_at,
            ).where(a.c.segment_id.is_not(None)),
            a.c.id,
        ),
        _paged(
            conn,
            select(d.c.id, d.c.action_id, d.c.phase, d.c.decided_at, d.c.allow, d.c.deny_key).where(
                d.c.phase == "propose", d.c.segment_id.is_not(None)
            ),
            d.c.id,
        ),
        _paged(
            conn,
            select(
                e.c.action_id,
                e.c.run_started_at,
                e.c.outcome,
                e.c.rollback_decided_at,
                e.c.rollback_requested_by,
                e.c.finished_at,
                e.c.rollback_verified_at,
            ).where(e.c.segment_id.is_not(None)),
            e.c.action_id,
        ),
    )
    add, later, _ = _statements(dialect_name)
    rows = changes.day_rows()
    for start in range(0, len(rows), _PAGE):
        conn.execute(add, rows[start : start + _PAGE])
    latest = changes.latest_rows()
    for start in range(0, len(latest), _PAGE):
        conn.execute(later, latest[start : start + _PAGE])
    return len(rows)
