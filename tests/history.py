"""A seeded history of actions with known outcomes, and its ground truth in plain Python.

`generate(n, seed, start, end)` returns `Record`s (an action, its decisions, its
execution) drawn from fixed distributions; `write(store, records)` stores them through
the store's named operations; `truth_*` compute every report figure from the records
alone, independently of SQL, so tests can compare.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from opsgate.models import (
    Action,
    ActionState,
    Decision,
    DenyReason,
    Execution,
    Identity,
    Incident,
    VerificationSpec,
)
from opsgate.store.base import Store

SEVERITIES = ("sev1", "sev2", "sev3")
CLASSES = ("deploy-related", "capacity", "dependency", "config")
TIERS = ("critical", "standard", "internal")
ENVIRONMENTS = ("prod", "staging")
ACTIONS = ("rollback_deploy", "scale_deployment", "restart_service", "toggle_feature_flag")
CODES = ("not_allowlisted", "param_out_of_bounds", "insufficient_permissions", "change_freeze")
EXEC_CODES = ("change_freeze", "concurrent_action", "missing_precondition")
OUTCOMES = (
    ("succeeded", 0.66),
    ("stopped", 0.12),
    ("failed_verification", 0.06),
    ("timeout", 0.05),
    ("provider_errors", 0.04),
    ("runner_error", 0.05),
    (None, 0.02),  # still verifying
)
STOPS = ("error_spike", "latency_spike")


@dataclass
class Record:
    action: Action
    decisions: list[Decision]
    execution: Execution | None = None
    segments: dict[str, str | None] = field(default_factory=dict)


def _pick(rng: random.Random, weighted: Sequence[tuple[Any, float]]) -> Any:
    roll = rng.random()
    total = 0.0
    for value, weight in weighted:
        total += weight
        if roll < total:
            return value
    return weighted[-1][0]


def _decision(action_id: str, i: int, phase: str, at: datetime, codes: Sequence[str]) -> Decision:
    return Decision(
        id=f"d{phase[0]}{i:09d}",
        action_id=action_id,
        phase=phase,  # type: ignore[arg-type]
        allow=not codes,
        deny=tuple(DenyReason(code=c, message=c) for c in codes),
        engine="embedded",
        bundle_revision="sha256:seed",
        input={},
        result={"allow": not codes},
        decided_at=at,
        duration_ms=1.0,
    )


def generate(n: int, seed: int, start: datetime, end: datetime) -> list[Record]:
    rng = random.Random(seed)
    span = (end - start).total_seconds()
    records: list[Record] = []
    for i in range(n):
        created = start + timedelta(seconds=rng.uniform(0, span))
        action_id = f"a{i:09d}"
        segments = {
            "severity": rng.choice(SEVERITIES),
            "incident_class": rng.choice(CLASSES) if rng.random() > 0.05 else None,
            "tier": rng.choice(TIERS),
            "environment": rng.choice(ENVIRONMENTS),
            "action": rng.choice(ACTIONS),
            "proposer_kind": "agent" if rng.random() < 0.4 else "human",
        }
        codes: list[str] = []
        if rng.random() < 0.2:
            codes = rng.sample(CODES, rng.choice((1, 1, 2)))
        decisions = [_decision(action_id, i, "propose", created, codes)]
        state = ActionState.BLOCKED if codes else ActionState.PENDING_APPROVAL
        approved_at: datetime | None = None
        execution: Execution | None = None
        if not codes:
            fate = _pick(
                rng,
                (("approved", 0.72), ("rejected", 0.1), ("expired", 0.08),
                 ("cancelled", 0.05), ("pending", 0.05)),
            )  # fmt: skip
            if fate == "approved":
                approved_at = created + timedelta(seconds=rng.uniform(5, 3600))
                checked = approved_at + timedelta(seconds=1)
                exec_codes = [rng.choice(EXEC_CODES)] if rng.random() < 0.08 else []
                decisions.append(_decision(action_id, i, "execute", checked, exec_codes))
                if exec_codes:
                    state = ActionState.BLOCKED_AT_EXECUTION
                else:
                    execution, state = _execution(rng, action_id, f"t{i}", checked)
            else:
                state = {
                    "rejected": ActionState.REJECTED,
                    "expired": ActionState.EXPIRED,
                    "cancelled": ActionState.CANCELLED,
                    "pending": ActionState.PENDING_APPROVAL,
                }[fate]
        action = Action(
            id=action_id,
            action_type=str(segments["action"]),
            target=f"t{i}",
            environment=str(segments["environment"]),
            params={},
            reason="seeded",
            incident=Incident(
                id=f"INC-{i}",
                severity=segments["severity"],  # type: ignore[arg-type]
                class_=segments["incident_class"],
                tier=segments["tier"],  # type: ignore[arg-type]
            ),
            verification=VerificationSpec(),
            risk="medium",
            reversible=True,
            spec_hash="sha256:seed",
            proposer=Identity(id="seed", kind=segments["proposer_kind"]),  # type: ignore[arg-type]
            state=state,
            created_at=created,
            updated_at=created,
            approved_at=approved_at,
        )
        records.append(Record(action, decisions, execution, segments))
    return records


def _execution(
    rng: random.Random, action_id: str, target: str, claimed: datetime
) -> tuple[Execution, ActionState]:
    run_started = claimed + timedelta(seconds=0.5)
    outcome = _pick(rng, OUTCOMES)
    facts: dict[str, Any] = {"run_started_at": run_started}
    state = ActionState.VERIFYING
    if outcome == "succeeded":
        state = ActionState.SUCCEEDED
        facts["finished_at"] = run_started + timedelta(seconds=120)
    elif outcome is not None:
        facts["trigger_name"] = rng.choice(STOPS) if outcome == "stopped" else None
        decided = run_started + timedelta(seconds=rng.uniform(2, 600))
        facts["rollback_decided_at"] = decided
        if rng.random() < 0.85:
            facts["rollback_verified_at"] = decided + timedelta(
                seconds=round(rng.lognormvariate(3.5, 0.8), 3)
            )
            state = ActionState.ROLLED_BACK
        else:
            state = ActionState.ROLLBACK_FAILED
        facts["finished_at"] = decided + timedelta(seconds=900)
    execution = Execution(
        action_id=action_id,
        target=target,
        environment="prod",
        worker_id="seed-worker",
        claimed_at=claimed,
        lease_expires_at=claimed + timedelta(seconds=30),
        heartbeat_at=claimed,
        outcome=outcome,
        **facts,
    )
    return execution, state


def write(store: Store, records: Iterable[Record], batch: int = 500) -> None:
    """Through the store's named operations, `batch` actions per transaction."""
    chunk: list[Record] = []

    def flush() -> None:
        with store.transaction() as tx:
            for record in chunk:
                tx.insert_action(record.action)
                for decision in record.decisions:
                    tx.insert_decision(decision)
                if record.execution is not None:
                    tx.insert_execution(record.execution)
        chunk.clear()

    for record in records:
        chunk.append(record)
        if len(chunk) >= batch:
            flush()
    if chunk:
        flush()


# --- ground truth, from the records alone -----------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _segment_of(record: Record, by: str | None) -> str:
    if by is None:
        return "all"
    value = record.segments[by]
    return "(none)" if value is None else str(value)


Matcher = Callable[[Record], bool]


def _in(at: datetime | None, since: datetime, until: datetime) -> bool:
    return at is not None and since <= at < until


def truth_verification(
    records: Iterable[Record], since: datetime, until: datetime, by: str | None = None
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"started": 0, "finished": 0, "succeeded": 0, "causes": defaultdict(int),
                 "stops": defaultdict(int), "in_progress": 0}
    )  # fmt: skip
    for record in records:
        e = record.execution
        if e is None or not _in(e.run_started_at, since, until):
            continue
        row = out[_segment_of(record, by)]
        row["started"] += 1
        if e.outcome is None:
            row["in_progress"] += 1
            continue
        row["finished"] += 1
        if e.outcome == "succeeded":
            row["succeeded"] += 1
        else:
            row["causes"][e.outcome] += 1
        if e.outcome == "stopped":
            row["stops"][e.trigger_name] += 1
    return dict(out)


def truth_rollbacks(
    records: Iterable[Record], since: datetime, until: datetime, by: str | None = None
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = defaultdict(lambda: {"decided": 0, "durations": []})
    for record in records:
        e = record.execution
        if e is None or not _in(e.rollback_decided_at, since, until):
            continue
        row = out[_segment_of(record, by)]
        row["decided"] += 1
        if e.rollback_verified_at is not None and e.rollback_decided_at is not None:
            row["durations"].append(
                (e.rollback_verified_at - e.rollback_decided_at).total_seconds()
            )
    return dict(out)


def truth_blocks(
    records: Iterable[Record],
    since: datetime,
    until: datetime,
    by: str | None = None,
    phase: str = "propose",
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"decided": 0, "blocked": 0, "with_code": defaultdict(int),
                 "first_code": defaultdict(int)}
    )  # fmt: skip
    for record in records:
        for decision in record.decisions:
            if decision.phase != phase or not _in(decision.decided_at, since, until):
                continue
            row = out[_segment_of(record, by)]
            row["decided"] += 1
            if not decision.allow:
                row["blocked"] += 1
                for code in set(decision.deny_codes):
                    row["with_code"][code] += 1
                row["first_code"][decision.deny_codes[0]] += 1
    return dict(out)


def truth_approvals(
    records: Iterable[Record], since: datetime, until: datetime, by: str | None = None
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"waited": 0, "approved": 0, "rejected": 0, "expired": 0, "waits": []}
    )
    for record in records:
        action = record.action
        if action.state is ActionState.BLOCKED or not _in(action.created_at, since, until):
            continue
        row = out[_segment_of(record, by)]
        row["waited"] += 1
        if action.approved_at is not None:
            row["approved"] += 1
            row["waits"].append((action.approved_at - action.created_at).total_seconds())
        elif action.state is ActionState.REJECTED:
            row["rejected"] += 1
        elif action.state is ActionState.EXPIRED:
            row["expired"] += 1
    return dict(out)
