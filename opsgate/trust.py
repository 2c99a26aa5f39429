"""A proposer's track record: what it proposed and how its runs went, as policy input.

Every decision (propose, the execution re-check, approval) carries
`proposer.track_record`, read from the store at decision time over a window (default
90 days, OPSGATE_TRACK_RECORD_WINDOW) and cut three ways: `overall`, `action_type` (this
type in any environment) and `action_type_in_environment`. The figures are the reports'
figures (opsgate.reports.queries), narrowed to one proposer, so a scorecard and the
policy never disagree about what "a verified pass" is. The shipped bundle's trust ladder
(policies/opsgate.rego) reads them; `opsgate trust reset` records the human reset that
lifts `trust_revoked`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from opsgate.errors import InvalidInput
from opsgate.policies.engine import PolicyResult
from opsgate.reports.queries import (
    SEGMENT_NAMES,
    BlocksCube,
    Dims,
    RunHistory,
    Window,
    rollup_blocks,
    rollup_verification,
)
from opsgate.store.track_summary import (
    ANY,
    COUNTERS,
    WITH_CODE,
    as_utc,
    window_days,
    window_start,
)

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from opsgate.authorization import Actor
    from opsgate.gate import Gate
    from opsgate.models import TrustReset
    from opsgate.store.sql import SqlStore

DEFAULT_WINDOW = 90 * 86400.0
TRACK_RECORD_UNAVAILABLE = "track_record_unavailable"
TRUST_REVOKED = "trust_revoked"
SCOPES = ("overall", "action_type", "action_type_in_environment")
_ENVIRONMENT = SEGMENT_NAMES.index("environment")
_ACTION = SEGMENT_NAMES.index("action")


@dataclass
class Facts:
    """What a store reads for one proposer in one window, before the cut into scopes.

    Cubes are at the reports' finest grain (segment dims); approvals and rollbacks come
    already cut, per scope, from the reports' own queries."""

    verification: list[tuple[Dims, str | None, str | None, int]] = field(default_factory=list)
    blocks: BlocksCube = field(default_factory=lambda: BlocksCube("propose"))
    # scope -> (approved, rejected)
    approvals: dict[str, tuple[int, int]] = field(default_factory=dict)
    # scope -> (automatic rollbacks, rollbacks that failed)
    rollbacks: dict[str, tuple[int, int]] = field(default_factory=dict)
    history: list[tuple[Dims, RunHistory]] = field(default_factory=list)


class TrackRecordReader(Protocol):
    """The store operations a track record needs (Store and StoreTx have them all)."""

    def track_record_facts(
        self, proposer_id: str, action_type: str, environment: str, since: datetime, until: datetime
    ) -> Facts: ...

    def track_record_figures(
        self, proposer_id: str, action_type: str, environment: str, since: datetime
    ) -> dict[str, Figures]: ...

    def last_trust_reset(
        self, proposer_id: str, action_type: str, before: datetime | None = None
    ) -> datetime | None: ...


@dataclass
class Figures:
    proposals: int = 0
    blocked: int = 0
    blocked_by_code: dict[str, int] = field(default_factory=dict)
    approved: int = 0
    rejected: int = 0
    executed: int = 0  # runs started in the window
    finished: int = 0  # of those, ended: the denominator of every rate
    verified_passes: int = 0
    failed_verifications: int = 0
    stop_conditions: int = 0
    automatic_rollbacks: int = 0
    rollbacks_failed: int = 0
    # Over all time, not the window: a rollback does not age out of the ladder.
    history: RunHistory = field(default_factory=RunHistory)

    @property
    def pass_rate(self) -> float | None:
        return self.verified_passes / self.finished if self.finished else None

    def last_run(self) -> dict[str, Any] | None:
        """The newest finished run and how it ended (ties: the worse reading)."""
        h = self.history
        if h.last_finished is None:
            return None
        return {
            "finished_at": _rfc3339(h.last_finished),
            "finished_ns": _ns(h.last_finished),
            "failed_or_rolled_back": h.last_failed_or_rolled_back == h.last_finished,
            "rolled_back": h.last_rolled_back == h.last_finished,
            "rollback_failed": h.last_rollback_failed == h.last_finished,
        }

    def as_input(self, now: datetime) -> dict[str, Any]:
        last_bad = self.history.last_failed_or_rolled_back
        return {
            "proposals": self.proposals,
            "blocked": self.blocked,
            "blocked_by_code": dict(sorted(self.blocked_by_code.items())),
            "approved": self.approved,
            "rejected": self.rejected,
            "executed": self.executed,
            "finished": self.finished,
            "verified_passes": self.verified_passes,
            "failed_verifications": self.failed_verifications,
            "stop_conditions": self.stop_conditions,
            "automatic_rollbacks": self.automatic_rollbacks,
            "rollbacks_failed": self.rollbacks_failed,
            "pass_rate": self.pass_rate,
            "seconds_since_last_failure": (
                max((now - last_bad).total_seconds(), 0.0) if last_bad is not None else None
            ),
            "last_run": self.last_run(),
        }


@dataclass
class TrackRecord:
    proposer_id: str
    action_type: str
    environment: str
    window: Window
    scopes: dict[str, Figures]
    reset_at: datetime | None = None  # the last `opsgate trust reset` for this type
    days: int = 90  # the window's length in whole UTC days, today included

    def as_input(self) -> dict[str, Any]:
        now = self.window.until
        return {
            "window_days": self.days,
            "since": _rfc3339(self.window.since),
            **{scope: self.scopes[scope].as_input(now) for scope in SCOPES},
            "trust_reset_at": _rfc3339(self.reset_at) if self.reset_at else None,
            "trust_reset_ns": _ns(self.reset_at) if self.reset_at else None,
        }


def _rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def _ns(at: datetime) -> int:
    return int(at.timestamp()) * 1_000_000_000 + at.microsecond * 1000


def in_scope(dims: Dims, scope: str, action_type: str, environment: str) -> bool:
    if scope == "overall":
        return True
    if dims[_ACTION] != action_type:
        return False
    return scope == "action_type" or dims[_ENVIRONMENT] == environment


def _latest(values: Iterable[datetime | None]) -> datetime | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def rollup(facts: Facts, action_type: str, environment: str) -> dict[str, Figures]:
    """The facts cut into the three scopes, with the reports' own rollups."""
    out: dict[str, Figures] = {}
    for scope in SCOPES:

        def keep(dims: Dims, scope: str = scope) -> bool:
            return in_scope(dims, scope, action_type, environment)

        figures = Figures()
        runs = rollup_verification([row for row in facts.verification if keep(row[0])], ())
        if runs:
            row = runs[0]
            figures.executed, figures.finished = row.started, row.finished
            figures.verified_passes = row.succeeded
            figures.failed_verifications = row.causes.get("failed_verification", 0)
            figures.stop_conditions = row.causes.get("stopped", 0)
        cube = BlocksCube(
            facts.blocks.phase,
            [t for t in facts.blocks.totals if keep(t[0])],
            [c for c in facts.blocks.with_code if keep(c[0])],
            [c for c in facts.blocks.first_code if keep(c[0])],
        )
        blocks = rollup_blocks(cube, ())
        if blocks:
            figures.proposals, figures.blocked = blocks[0].decided, blocks[0].blocked
            figures.blocked_by_code = dict(blocks[0].with_code)
        figures.approved, figures.rejected = facts.approvals.get(scope, (0, 0))
        figures.automatic_rollbacks, figures.rollbacks_failed = facts.rollbacks.get(scope, (0, 0))
        histories = [h for dims, h in facts.history if keep(dims)]
        figures.history = RunHistory(
            _latest(h.last_finished for h in histories),
            _latest(h.last_failed_or_rolled_back for h in histories),
            _latest(h.last_rolled_back for h in histories),
            _latest(h.last_rollback_failed for h in histories),
        )
        out[scope] = figures
    return out


def window_ending(now: datetime, seconds: float) -> Window:
    """Whole UTC days: from midnight, N - 1 days before `now`'s day (N: `seconds` in days,
    rounded up), to `now`."""
    return Window(window_start(now, window_days(seconds)), now)


def track_record(
    reader: TrackRecordReader,
    proposer_id: str,
    action_type: str,
    environment: str,
    now: datetime,
    window_seconds: float = DEFAULT_WINDOW,
    *,
    as_of: bool = False,
) -> TrackRecord:
    """Read and cut one proposer's record; raises (StoreError, ...) if it cannot.

    A decision reads the store's summary: everything recorded since the window's first
    midnight. `as_of` (a replay, at a past `now`) counts the facts before `now` instead,
    with the reports' queries: the summary has no past."""
    window = window_ending(now, window_seconds)
    if as_of:
        facts = reader.track_record_facts(
            proposer_id, action_type, environment, window.since, window.until
        )
        scopes = rollup(facts, action_type, environment)
    else:
        scopes = reader.track_record_figures(proposer_id, action_type, environment, window.since)
    return TrackRecord(
        proposer_id,
        action_type,
        environment,
        window,
        scopes,
        reader.last_trust_reset(proposer_id, action_type, now),
        window_days(window_seconds),
    )


def summary_figures(
    days: Iterable[Any], latest: Iterable[Any], action_type: str, environment: str
) -> dict[str, Figures]:
    """The store summary's rows (opsgate/store/summary_sql.read) as the record's scopes."""
    scope_of = {
        (ANY, ANY): "overall",
        (action_type, ANY): "action_type",
        (action_type, environment): "action_type_in_environment",
    }
    out = {scope: Figures() for scope in SCOPES}
    for row_type, row_environment, code, *sums in days:
        scope = scope_of.get((row_type, row_environment))
        if scope is None:
            continue
        n = dict(zip((*COUNTERS, WITH_CODE), (int(v or 0) for v in sums), strict=True))
        figures = out[scope]
        if code:
            if n[WITH_CODE]:
                figures.blocked_by_code[code] = figures.blocked_by_code.get(code, 0) + n[WITH_CODE]
            continue
        figures.proposals += n["proposals"]
        figures.blocked += n["blocked"]
        figures.approved += n["approved"]
        figures.rejected += n["rejected"]
        figures.executed += n["executed"]
        figures.finished += n["finished"]
        figures.verified_passes += n["verified_passes"]
        figures.failed_verifications += n["failed_verifications"]
        figures.stop_conditions += n["stop_conditions"]
        figures.automatic_rollbacks += n["automatic_rollbacks"]
        figures.rollbacks_failed += n["rollbacks_failed"]
    for row_type, row_environment, *values in latest:
        scope = scope_of.get((row_type, row_environment))
        if scope is not None:
            out[scope].history = RunHistory(*(as_utc(v) for v in values))
    return out


def attach(
    document: dict[str, Any],
    reader: TrackRecordReader,
    *,
    now: datetime,
    window_seconds: float,
    as_of: bool = False,
) -> str | None:
    """Put `proposer.track_record` into a policy input; the reason if it could not be
    read (the caller then denies with TRACK_RECORD_UNAVAILABLE: fail closed)."""
    proposer = document.get("proposer")
    action = document.get("action")
    if not isinstance(proposer, dict) or not isinstance(action, Mapping):
        return "the input names no proposer or action"
    try:
        record = track_record(
            reader,
            str(proposer.get("id", "")),
            str(action.get("type", "")),
            str(action.get("environment", "")),
            now,
            window_seconds,
            as_of=as_of,
        )
    except Exception as exc:  # any failure denies, naming its reason
        proposer["track_record"] = None
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    proposer["track_record"] = record.as_input()
    return None


def unavailable_deny(reason: str) -> dict[str, str]:
    return {
        "code": TRACK_RECORD_UNAVAILABLE,
        "message": f"the proposer's track record could not be read ({reason}); "
        "retry when the store answers",
    }


# --- the store side ------------------------------------------------------------------


def sql_facts(
    store: SqlStore,
    conn: Connection | None,
    proposer_id: str,
    action_type: str,
    environment: str,
    since: datetime,
    until: datetime,
) -> Facts:
    """The reports' queries, narrowed to one proposer, on `conn` (the decision's
    transaction) when given."""
    from opsgate.reports.queries import ReportQueries

    q = ReportQueries(store, conn, proposer=proposer_id)
    window = Window(since, until)
    facts = Facts(
        verification=q.verification_cube(window, proposer=proposer_id),
        blocks=q.blocks_cube(window, proposer=proposer_id),
        history=q.run_history(proposer_id, until),
    )
    # One query each for every scope: the reports' own filter and counts, per segment.
    approvals = q.approvals_cube(window, proposer=proposer_id)
    rollbacks = q.rollbacks_cube(window, proposer=proposer_id)
    for scope in SCOPES:
        mine = [row for dims, row in approvals if in_scope(dims, scope, action_type, environment)]
        facts.approvals[scope] = (sum(r.approved for r in mine), sum(r.rejected for r in mine))
        undone = [row for dims, row in rollbacks if in_scope(dims, scope, action_type, environment)]
        facts.rollbacks[scope] = (sum(r.automatic for r in undone), sum(r.failed for r in undone))
    return facts


def without_record(result: PolicyResult, reason: str) -> PolicyResult:
    """The verdict when the record could not be read: a deny, whatever the policy said."""
    return replace(result, allow=False, deny=(*result.deny, unavailable_deny(reason)))


# --- the human reset -------------------------------------------------------------------

MAX_REASON = 2000
MAX_NAME = 128


def _checked_name(field_name: str, value: str) -> str:
    if not value or not value.strip():
        raise InvalidInput(field_name, "must not be empty")
    if len(value) > MAX_NAME:
        raise InvalidInput(field_name, f"longer than {MAX_NAME} characters")
    if any(not ch.isprintable() or ch.isspace() for ch in value):
        raise InvalidInput(field_name, "must not contain spaces or control characters")
    return value


def reset(gate: Gate, proposer_id: str, action_type: str, reason: str, actor: Actor) -> TrustReset:
    """A human with a reset role (authz verb `trust_reset`) lifts `trust_revoked` for one
    proposer and action type: the reset row and its audit event in one transaction; a
    refusal is recorded like any other authz refusal."""
    from opsgate.authorization import AUTHZ_RULE, as_principal, authz_input
    from opsgate.errors import did_you_mean
    from opsgate.gate import Evaluation
    from opsgate.lifecycle import new_id, record_event
    from opsgate.models import TrustReset

    _checked_name("proposer", proposer_id)
    _checked_name("action_type", action_type)
    known = set(gate.catalog.types)
    if action_type not in known:
        raise InvalidInput(
            "action_type",
            f"unknown action type {action_type!r}{did_you_mean(action_type, known)}",
        )
    if not reason.strip():
        raise InvalidInput("reason", "a trust reset needs a reason")
    if len(reason) > MAX_REASON:
        raise InvalidInput("reason", f"longer than {MAX_REASON} characters")
    principal = as_principal(actor)
    now = gate.clock()
    document = authz_input("trust_reset", principal, now)
    document["action"] = {"type": action_type}
    document["proposer"] = {"id": proposer_id}
    started = time.perf_counter()
    result, _ = gate.policy(AUTHZ_RULE, document, time.monotonic() + gate.decision_deadline)
    if not result.allow:
        evaluation = Evaluation(
            result, document, [], gate.engine.name, (time.perf_counter() - started) * 1000
        )
        with gate.store.transaction() as tx:
            refusal = gate._record_refusal(tx, "trust_reset", principal, evaluation, None, now)
        raise refusal
    record = TrustReset(
        id=new_id(),
        proposer_id=proposer_id,
        action_type=action_type,
        reset_by=principal.id,
        reason=reason,
        at=now,
    )
    with gate.store.transaction() as tx:
        tx.insert_trust_reset(record)
        record_event(
            tx,
            action_id=None,
            kind="trust.reset",
            actor=principal.id,
            now=now,
            data={
                "reset_id": record.id,
                "proposer": proposer_id,
                "action_type": action_type,
                "reason": reason,
            },
        )
    return record


def rung_today(
    gate: Gate, proposer_id: str, kind: str, action_type: str, environment: str, now: datetime
) -> str | None:
    """The trust-ladder rung the bundle gives this proposer for this type and environment
    at `now` (for the scorecard); None when the bundle names none or it cannot be read."""
    from opsgate.policies.engine import DECISION_RULE

    known = gate.catalog.types.get(action_type)
    document: dict[str, Any] = {
        "action": {
            "type": action_type,
            "environment": environment,
            "risk": known.risk if known is not None else "",
            "reversible": known.reversible if known is not None else False,
        },
        "proposer": {"id": proposer_id, "kind": kind},
        "context": {"now": _rfc3339(now), "now_ns": _ns(now)},
    }
    if attach(document, gate.store, now=now, window_seconds=gate.track_record_window):
        return None
    result, _ = gate.policy(DECISION_RULE, document, time.monotonic() + gate.decision_deadline)
    ladder = result.raw.get("ladder") if result.raw is not None else None
    rung = ladder.get("rung") if isinstance(ladder, Mapping) else None
    return str(rung) if isinstance(rung, str) else None
