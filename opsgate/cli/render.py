"""Rich tables and text for people; the JSON documents for tools are opsgate.views."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from opsgate.models import Action, Decision, Execution, Measurement
from opsgate.safe_text import shown, shown_block
from opsgate.verification.evaluator import VerificationState, evidence_wait
from opsgate.views import (
    action_json,
    approval_json,
    catalog_json,
    decision_json,
    details_json,
    event_json,
    execution_json,
    masked,
    measurement_json,
    plan_of,
    secret_names,
    ts,
)

if TYPE_CHECKING:  # types only: listing and queue load no catalog, gate or engine
    from opsgate.catalog import Catalog
    from opsgate.gate import ActionDetails


# Re-exported: the commands import their views from here.
__all__ = [
    "action_json",
    "approval_json",
    "catalog_json",
    "decision_json",
    "details_json",
    "event_json",
    "execution_json",
    "masked",
    "measurement_json",
    "plan_of",
    "secret_names",
    "shown",
    "shown_block",
    "ts",
]


def console() -> Console:
    return Console(soft_wrap=True, highlight=False)


def fmt_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def outcome_text(details: ActionDetails) -> str:
    """How an action ended, on one line: its state, why, and what stopped it."""
    action, execution = details.action, details.execution
    parts = [f"action {action.id} {action.state.value}"]
    if execution is not None:
        if execution.reason:
            parts.append(execution.reason)
        if execution.trigger_name:
            parts.append(f"{execution.trigger_name} = {fmt_value(execution.trigger_value)}")
        if execution.rollback_time is not None:
            parts.append(f"rollback time {execution.rollback_time:.1f}s")
    return "; ".join(parts)


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


def show_details(
    details: ActionDetails, catalog: Catalog | None, *, plan: dict[str, Any] | None = None
) -> None:
    """`plan`: the plan as the server made it (client mode); else made here from `catalog`."""
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
    for line in plan_lines(plan if plan is not None else plan_of(details, catalog)):
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
