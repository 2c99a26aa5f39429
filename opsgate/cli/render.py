"""Shared renderers: rich tables for people, plain JSON documents for tools."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from opsgate.models import Action, Approval, AuditEvent, Decision, Execution, Measurement
from opsgate.safe_text import shown, shown_block
from opsgate.verification.evaluator import VerificationState, evidence_wait

if TYPE_CHECKING:  # types only: listing and queue load no catalog, gate or engine
    from opsgate.catalog import Catalog
    from opsgate.gate import ActionDetails

__all__ = ["shown", "shown_block"]  # re-exported for the other commands


def console() -> Console:
    return Console(soft_wrap=True, highlight=False)


def ts(at: datetime | None) -> str | None:
    """UTC RFC 3339 with a Z, for people and tools alike."""
    if at is None:
        return None
    return at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def secret_names(
    action: Action, catalog: Catalog | None, events: Sequence[AuditEvent] = ()
) -> set[str] | None:
    """The params that were secret when the action was proposed (its creation event
    records them); else what today's catalog says; None when nobody can tell."""
    from opsgate.gate import SECRET_PARAMS_KEY

    for event in events:
        if event.action_id == action.id and event.from_state == "proposed":
            recorded = event.data.get(SECRET_PARAMS_KEY)
            if isinstance(recorded, list):
                return {str(name) for name in recorded}
            break
    if catalog is not None and action.action_type in catalog.types:
        specs = catalog.types[action.action_type].params
        return {name for name, spec in specs.items() if spec.secret}
    return None


def masked(
    action: Action, catalog: Catalog | None, events: Sequence[AuditEvent] = ()
) -> dict[str, Any]:
    secret = secret_names(action, catalog, events)
    if secret is None:  # which params are secret is unknown: show none of the values
        return {name: "***" for name in action.params}
    return {k: ("***" if k in secret else v) for k, v in action.params.items()}


def action_json(
    action: Action, catalog: Catalog | None = None, events: Sequence[AuditEvent] = ()
) -> dict[str, Any]:
    return {
        "id": action.id,
        "action": action.action_type,
        "target": action.target,
        "environment": action.environment,
        "params": masked(action, catalog, events),
        "reason": action.reason,
        "incident": action.incident.model_dump(by_alias=True),
        "risk": action.risk,
        "reversible": action.reversible,
        "spec_hash": action.spec_hash,
        "proposer": action.proposer.model_dump(),
        "state": action.state.value,
        "required_approvals": action.required_approvals,
        "approver_roles": list(action.approver_roles),
        "idempotency_key": action.idempotency_key,
        "created_at": ts(action.created_at),
        "updated_at": ts(action.updated_at),
        "expires_at": ts(action.expires_at),
        "verification": action.verification.model_dump(mode="json", by_alias=True),
    }


def decision_json(decision: Decision) -> dict[str, Any]:
    return {
        "id": decision.id,
        "action_id": decision.action_id,
        "phase": decision.phase,
        "allow": decision.allow,
        "deny": [d.model_dump() for d in decision.deny],
        "required_approvals": decision.required_approvals,
        "approver_roles": list(decision.approver_roles),
        "engine": decision.engine,
        "bundle_revision": decision.bundle_revision,
        "decided_at": ts(decision.decided_at),
        "duration_ms": round(decision.duration_ms, 3),
        "input": decision.input,
        "result": decision.result,
        "error": decision.error,
        "shadow": decision.shadow,
    }


def approval_json(approval: Approval) -> dict[str, Any]:
    return {
        "id": approval.id,
        "approver": approval.approver.model_dump(),
        "spec_hash": approval.spec_hash,
        "comment": approval.comment,
        "created_at": ts(approval.created_at),
    }


def event_json(event: AuditEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "id": event.id,
        "at": ts(event.at),
        "at_precise": event.at.astimezone(UTC).isoformat(timespec="microseconds"),
        "action_id": event.action_id,
        "kind": event.kind,
        "actor": event.actor,
        "from_state": event.from_state,
        "to_state": event.to_state,
        "data": event.data,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }


def execution_json(execution: Execution) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for name, value in execution.model_dump(mode="python").items():
        document[name] = ts(value) if isinstance(value, datetime) else value
    document["rollback_time"] = execution.rollback_time
    return document


def measurement_json(measurement: Measurement) -> dict[str, Any]:
    return {
        "phase": measurement.phase,
        "name": measurement.name,
        "kind": measurement.kind,
        "at": measurement.at.astimezone(UTC).isoformat(timespec="milliseconds"),
        "value": measurement.value,
        "outcome": measurement.outcome,
        "detail": measurement.detail,
        "counted": measurement.not_counted is None,
        "not_counted": measurement.not_counted,
    }


def plan_of(details: ActionDetails, catalog: Catalog | None) -> dict[str, Any]:
    from opsgate.executor.plan import action_plan

    action = details.action
    action_type = catalog.types.get(action.action_type) if catalog is not None else None
    captured = details.execution.captured if details.execution is not None else {}
    return action_plan(action, action_type, captured)


def details_json(details: ActionDetails, catalog: Catalog | None) -> dict[str, Any]:
    return {
        "action": action_json(details.action, catalog, details.events),
        "plan": plan_of(details, catalog),
        "decisions": [decision_json(d) for d in details.decisions],
        "approvals": [approval_json(a) for a in details.approvals],
        "execution": execution_json(details.execution) if details.execution else None,
        "measurements": [measurement_json(m) for m in details.measurements],
        "events": [event_json(e) for e in details.events],
    }


def fmt_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def evidence_note(state: VerificationState, now: datetime) -> str | None:
    """ "waiting for post-change evidence (12s)" while signal measurements do not count."""
    why, left = evidence_wait(state, now)
    if why == "pre_change":
        return f"waiting for post-change evidence ({left:.0f}s)"
    if why == "settling":
        return f"settling: initial delay ({left:.0f}s)"
    return None


def _evidence_row(stored: Mapping[str, Any] | None, finished: datetime | None) -> str | None:
    """While verifying: how long until measurements count; afterwards: from when they did."""
    if not stored:
        return None
    try:
        state = VerificationState.model_validate(dict(stored))
    except ValueError:
        return None
    starts = state.counting_starts()
    if starts is None:
        return None
    if finished is None and not state.done:
        note = evidence_note(state, datetime.now(UTC))
        if note is not None:
            return note
    return f"counted from {ts(starts)}"


def show_execution(execution: Execution, measurements: Sequence[Measurement]) -> None:
    rows: dict[str, Any] = {
        "worker": execution.worker_id,
        "claimed": ts(execution.claimed_at),
        "captured": ", ".join(f"{k}={v}" for k, v in execution.captured.items()) or "nothing",
        "run": _step_line(
            execution.run_started_at,
            execution.run_finished_at,
            execution.run_exit_code,
            execution.run_error,
        ),
        "verification started": ts(execution.verify_started_at),
        "post-change evidence": _evidence_row(execution.verify_state, execution.finished_at),
        "outcome": execution.outcome,
        "reason": execution.reason or None,
    }
    if execution.trigger_name:
        rows["fired"] = (
            f"{execution.trigger_kind} {execution.trigger_name} = "
            f"{fmt_value(execution.trigger_value)}"
        )
    if execution.rollback_decided_at:
        rows["rollback decided"] = ts(execution.rollback_decided_at)
        if execution.rollback_requested_by:
            rows["rollback requested by"] = execution.rollback_requested_by
        rows["undo"] = _step_line(
            execution.undo_started_at,
            execution.undo_finished_at,
            execution.undo_exit_code,
            execution.undo_error,
        )
        rows["rollback evidence"] = _evidence_row(
            execution.rollback_verify_state, execution.finished_at
        )
        rows["rollback verified"] = ts(execution.rollback_verified_at) or "not verified"
        if execution.rollback_time is not None:
            rows["rollback time"] = f"{execution.rollback_time:.1f}s"
    rows["finished"] = ts(execution.finished_at)
    kv_table({k: v for k, v in rows.items() if v is not None}, title="\nexecution")
    for label, output in (
        ("run output", execution.run_output),
        ("undo output", execution.undo_output),
    ):
        if output.strip():
            click.echo(f"\n{label}:\n{shown_block(output.rstrip())}")
    if not measurements:
        return
    table = Table(title=f"\nmeasurements ({len(measurements)})", title_justify="left")
    for column in ("at", "phase", "name", "value", "outcome", "detail"):
        table.add_column(column, overflow="fold")
    style = {"pass": "green", "fail": "red", "error": "magenta", "inconclusive": "yellow"}
    for m in measurements:
        table.add_row(
            m.at.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3],
            m.phase,
            escape(shown(m.name)),
            fmt_value(m.value),
            (
                f"[dim]{m.outcome} ({m.not_counted.replace('_', '-')})[/]"
                if m.not_counted
                else f"[{style[m.outcome]}]{m.outcome}[/]"
            ),
            escape(shown(m.detail)),
        )
    console().print(table)


def _step_line(
    started: datetime | None, finished: datetime | None, code: int | None, error: str | None
) -> str:
    if started is None:
        return "not started"
    if finished is None:
        return f"started {ts(started)}, not finished"
    took = (finished - started).total_seconds()
    result = "ok" if error is None else f"failed: {error}"
    exit_code = f", exit {code}" if code is not None else ""
    return f"{result} ({took:.1f}s{exit_code})"


def deny_lines(decision: Decision) -> list[str]:
    return [f"  deny {shown(d.code)}: {shown(d.message)}" for d in decision.deny]


def actions_table(actions: Sequence[Action], title: str) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("id", "action", "target", "env", "state", "approvals", "proposer", "created"):
        table.add_column(column, overflow="fold")
    for action in actions:
        cells = (
            action.id,
            action.action_type,
            action.target,
            action.environment,
            action.state.value,
            f"{action.required_approvals} ({'|'.join(action.approver_roles) or 'any'})",
            f"{action.proposer.id} ({action.proposer.kind})",
            ts(action.created_at) or "",
        )
        table.add_row(*(escape(shown(cell)) for cell in cells))
    console().print(table)


def kv_table(rows: Mapping[str, Any], title: str | None = None) -> None:
    table = Table(show_header=False, title=title, title_justify="left", box=None)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in rows.items():
        table.add_row(key, "" if value is None else escape(shown(value)))
    console().print(table)


def show_details(details: ActionDetails, catalog: Catalog | None) -> None:
    action = details.action
    params = ", ".join(f"{k}={v}" for k, v in masked(action, catalog, details.events).items())
    kv_table(
        {
            "id": action.id,
            "action": action.action_type,
            "target": f"{action.target} ({action.environment})",
            "params": params,
            "state": action.state.value,
            "reason": action.reason,
            "incident": " ".join(
                str(v) for v in action.incident.model_dump(by_alias=True).values() if v
            ),
            "proposer": f"{action.proposer.id} ({action.proposer.kind})",
            "risk": f"{action.risk}, {'reversible' if action.reversible else 'IRREVERSIBLE'}",
            "approvals": f"{len(details.approvals)} of {action.required_approvals} "
            f"({'|'.join(action.approver_roles) or 'any role'})",
            "spec_hash": action.spec_hash,
            "created": ts(action.created_at),
            "expires": ts(action.expires_at),
            "signals": ", ".join(s.name for s in action.verification.signals) or "none",
            "stop conditions": ", ".join(s.name for s in action.verification.stop_conditions)
            or "none",
        }
    )
    from opsgate.executor.plan import plan_lines

    click.echo("\nplan:")
    for line in plan_lines(plan_of(details, catalog)):
        click.echo(f"  {shown(line)}")
    for decision in details.decisions:
        verdict = "allow" if decision.allow else "deny"
        click.echo(
            f"\ndecision {decision.phase}: {verdict} at {ts(decision.decided_at)} "
            f"(engine {decision.engine}, bundle {decision.bundle_revision[:19]})"
        )
        for line in deny_lines(decision):
            click.echo(line)
        shadow = decision.shadow
        if shadow is not None and shadow.get("allow") != decision.allow:
            codes = ", ".join(d.get("code", "") for d in shadow.get("deny", []))
            verdict = f"would have blocked ({codes})" if not shadow.get("allow") else "would allow"
            click.echo(f"  shadow bundle {str(shadow.get('revision'))[:19]}: {shown(verdict)}")
    for approval in details.approvals:
        note = f": {shown(approval.comment)}" if approval.comment else ""
        who = shown(approval.approver.id)
        click.echo(f"\napproved by {who} at {ts(approval.created_at)}{note}")
    if details.execution is not None:
        show_execution(details.execution, details.measurements)
    table = Table(title="\naudit events", title_justify="left")
    for column in ("seq", "at", "kind", "actor", "transition"):
        table.add_column(column)
    for event in details.events:
        transition = f"{event.from_state} -> {event.to_state}" if event.to_state else ""
        cells = (str(event.seq), ts(event.at) or "", event.kind, event.actor, transition)
        table.add_row(*(escape(shown(cell)) for cell in cells))
    console().print(table)
