"""propose, queue, show, approve, reject, cancel."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import click

from opsgate.cli.completion import action_types, environments
from opsgate.cli.context import CliConfig, echo_json, json_option, pass_config
from opsgate.cli.ids import ACTION_ID
from opsgate.cli.render import (
    action_json,
    actions_table,
    approval_json,
    decision_json,
    deny_lines,
    details_json,
    show_details,
)
from opsgate.errors import ConfigError, InvalidInput, Refused
from opsgate.models import ActionState

MAX_PROPOSAL_BYTES = 1_000_000


def read_document(path: str) -> Any:
    """A proposal from a YAML/JSON file, or stdin with `-`."""
    try:
        if path == "-":
            raw = sys.stdin.buffer.read(MAX_PROPOSAL_BYTES + 1)
        else:
            with Path(path).open("rb") as handle:
                raw = handle.read(MAX_PROPOSAL_BYTES + 1)
    except OSError as exc:
        raise InvalidInput("file", f"cannot read {path}: {exc.strerror}") from exc
    if len(raw) > MAX_PROPOSAL_BYTES:
        raise InvalidInput("file", f"larger than {MAX_PROPOSAL_BYTES} bytes")
    from opsgate.catalog import load_yaml_text  # YAML only when a file is read

    document = load_yaml_text(raw, "file" if path == "-" else path)
    if document is None:
        raise InvalidInput("file", "the document is empty")
    return document


def parse_params(pairs: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput("--param", f"expected KEY=VALUE, got {pair!r}")
        if key in params:
            raise InvalidInput(f"params.{key}", "given twice")
        params[key] = value
    return params


def proposal_options(func: Any) -> Any:
    options = [
        click.argument("action", required=False, shell_complete=action_types),
        click.option("-f", "--file", "file", help="Proposal as YAML or JSON; `-` reads stdin."),
        click.option("--target", help="The service or resource acted on."),
        click.option(
            "--env", "environment", help="Environment, e.g. prod.", shell_complete=environments
        ),
        click.option("--param", "params", multiple=True, metavar="KEY=VALUE"),
        click.option("--reason", help="Why; shown to approvers and auditors."),
        click.option("--incident", "incident_id", help="Incident ID, e.g. INC-42."),
        click.option("--severity", type=click.Choice(["sev1", "sev2", "sev3", "sev4"])),
        click.option("--incident-class", "incident_class", help="e.g. deploy-related."),
        click.option("--tier", type=click.Choice(["critical", "standard", "internal"])),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_document(
    action: str | None,
    file: str | None,
    target: str | None,
    environment: str | None,
    params: tuple[str, ...],
    reason: str | None,
    incident_id: str | None,
    severity: str | None,
    incident_class: str | None,
    tier: str | None,
) -> dict[str, Any]:
    """A proposal document from a file and/or flags; flags win over the file."""
    document: dict[str, Any] = {}
    if file is not None:
        loaded = read_document(file)
        if not isinstance(loaded, dict):
            raise InvalidInput("proposal", "expected a mapping (YAML or JSON object)")
        document = dict(loaded)
    elif action is None:
        raise InvalidInput("action", "name an action type or give -f FILE")
    if action is not None:
        document["action"] = action
    for key, value in (("target", target), ("environment", environment), ("reason", reason)):
        if value is not None:
            document[key] = value
    if params:
        merged = (
            dict(document.get("params") or {}) if isinstance(document.get("params"), dict) else {}
        )
        merged.update(parse_params(params))
        document["params"] = merged
    incident_flags = {
        "id": incident_id,
        "severity": severity,
        "class": incident_class,
        "tier": tier,
    }
    if any(v is not None for v in incident_flags.values()):
        incident = document.get("incident")
        incident = dict(incident) if isinstance(incident, dict) else {}
        incident.update({k: v for k, v in incident_flags.items() if v is not None})
        document["incident"] = incident
    return document


@click.command()
@proposal_options
@click.option("--idempotency-key", help="Retries with the same key return the same action.")
@json_option
@pass_config
def propose(config: CliConfig, idempotency_key: str | None, as_json: bool, **fields: Any) -> None:
    """Propose an action: checked against policy now, then queued for approval."""
    document = build_document(**fields)
    if idempotency_key is not None:
        document["idempotency_key"] = idempotency_key
    identity = config.identity()
    outcome = config.actions.propose(document, identity)
    action, decision = outcome.action, outcome.decision
    if as_json:
        echo_json(
            {
                "action": action_json(action, config.render_catalog),
                "decision": decision_json(decision),
                "existing": outcome.existing,
            }
        )
    else:
        prefix = "existing action" if outcome.existing else "action"
        if action.state is ActionState.BLOCKED:
            click.echo(f"{prefix} {action.id} blocked by policy:")
            for line in deny_lines(decision):
                click.echo(line)
        else:
            roles = "|".join(action.approver_roles) or "any role"
            click.echo(
                f"{prefix} {action.id} {action.state.value}: needs "
                f"{action.required_approvals} approval(s) from {roles}"
            )
    if action.state is ActionState.BLOCKED:
        raise SystemExit(Refused.exit_code)


@click.command()
@click.option("--mine-to-approve", is_flag=True, help="Only what you may approve now.")
@json_option
@pass_config
def queue(config: CliConfig, mine_to_approve: bool, as_json: bool) -> None:
    """What waits for approval, oldest first: progress, time left, reason."""
    if config.server_url is not None:  # client mode: the server lists, and masks
        actions = config.remote.queue(mine_to_approve)
        if as_json:
            echo_json([action_json(a, config.render_catalog) for a in actions])
        elif not actions:
            click.echo(
                "nothing you may approve waits" if mine_to_approve else "nothing waits for approval"
            )
        else:
            title = "you may approve" if mine_to_approve else "waiting for approval"
            actions_table(actions, f"{len(actions)} {title}")
        return
    from opsgate.cli.listing import show_queue

    config.expire_due()
    waiting = config.store.list_actions(states=[ActionState.PENDING_APPROVAL], limit=1000)
    show_queue(config, waiting, mine_to_approve, as_json)


@click.command()
@click.argument("action_id", type=ACTION_ID)
@click.option("--watch", "follow", is_flag=True, help="Follow it to its end (`opsgate watch`).")
@json_option
@pass_config
def show(config: CliConfig, action_id: str, follow: bool, as_json: bool) -> None:
    """Everything known about one action: decision, approvals, audit events."""
    if follow:
        from opsgate.cli.watch import watch

        click.get_current_context().invoke(watch, action_id=action_id, as_json=as_json)
        return
    catalog = config.render_catalog
    remote = config.remote
    if remote is not None:
        # Client mode: the server reads, masks and plans with its catalog; the client has
        # none, and planning here would say the action type no longer exists.
        remote.expire_due()
        document = remote.details_document(action_id)
        if as_json:
            echo_json(document)
        else:
            from opsgate.client.remote import details_from_json

            show_details(details_from_json(document), None, plan=document["plan"])
        return
    if catalog is not None:
        # A broken policy bundle: expiry is left to the next command that can decide.
        with contextlib.suppress(ConfigError):
            config.gate.expire_due()
    from opsgate.gate import action_details

    # From the store alone: a broken catalog file must not hide any action's history.
    details = action_details(config.store, action_id)
    if as_json:
        echo_json(details_json(details, catalog))
    else:
        show_details(details, catalog)


@click.command()
@click.argument("action_id", type=ACTION_ID)
@click.option("--comment", default="", help="Why you approve; goes into the audit trail.")
@json_option
@pass_config
def approve(config: CliConfig, action_id: str, comment: str, as_json: bool) -> None:
    """Approve a pending action (never your own)."""
    outcome = config.actions.approve(action_id, config.identity(), comment)
    action = outcome.action
    if as_json:
        echo_json(
            {
                "action": action_json(action, config.render_catalog),
                "approvals": [approval_json(a) for a in outcome.approvals],
                "counted": outcome.counted,
            }
        )
        return
    if not outcome.counted:
        click.echo(f"you already approved {action.id}; an approval counts once")
    elif action.state is ActionState.APPROVED:
        click.echo(
            f"action {action.id} approved ({len(outcome.approvals)} of "
            f"{action.required_approvals}); ready to run"
        )
    else:
        click.echo(
            f"approval recorded: {len(outcome.approvals)} of "
            f"{action.required_approvals} for {action.id}"
        )


@click.command()
@click.argument("action_id", type=ACTION_ID)
@click.option("--reason", required=True, help="Why; goes into the audit trail.")
@json_option
@pass_config
def reject(config: CliConfig, action_id: str, reason: str, as_json: bool) -> None:
    """Reject a pending action."""
    action = config.actions.reject(action_id, config.identity(), reason)
    if as_json:
        echo_json(action_json(action, config.render_catalog))
    else:
        click.echo(f"action {action.id} rejected")


@click.command()
@click.argument("action_id", type=ACTION_ID)
@click.option("--reason", default="", help="Why; goes into the audit trail.")
@json_option
@pass_config
def cancel(config: CliConfig, action_id: str, reason: str, as_json: bool) -> None:
    """Withdraw a pending or approved action before it runs."""
    action = config.actions.cancel(action_id, config.identity(), reason)
    if as_json:
        echo_json(action_json(action, config.render_catalog))
    else:
        click.echo(f"action {action.id} cancelled")
