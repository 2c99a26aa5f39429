"""`opsgate run` and `opsgate rollback` in client mode: the server carries them out; this
side follows the action until it ends and exits as the local command would."""

from __future__ import annotations

import time
import urllib.parse

import click

from opsgate.cli.context import CliConfig, echo_json
from opsgate.cli.render import details_json, outcome_text
from opsgate.client.remote import action_from_json
from opsgate.errors import ActionFailed, Refused
from opsgate.gate import ActionDetails
from opsgate.models import ActionState

POLL_SECONDS = 0.5


def _follow(config: CliConfig, action_id: str) -> ActionDetails:
    """Poll the server until the action is terminal; Ctrl-C stops watching, not the run."""
    while True:
        details: ActionDetails = config.remote.details(action_id)
        if details.action.state.terminal:
            return details
        time.sleep(POLL_SECONDS)


def _path(action_id: str, verb: str) -> str:
    return f"/actions/{urllib.parse.quote(action_id, safe='')}/{verb}"


def remote_run(config: CliConfig, action_id: str, as_json: bool) -> None:
    started = action_from_json(config.remote.client.call("POST", _path(action_id, "run"), {}))
    if not as_json:
        click.echo(f"action {action_id} {started.state.value} on the server", err=True)
    details = _follow(config, action_id)
    state = details.action.state
    if as_json:
        echo_json(details_json(details, None))
    elif state is ActionState.SUCCEEDED:
        click.echo(outcome_text(details))
    if state is ActionState.BLOCKED_AT_EXECUTION:
        executes = [d for d in details.decisions if d.phase == "execute"]
        codes = executes[-1].deny_codes if executes else []
        messages = "; ".join(d.message or d.code for d in executes[-1].deny) if executes else ""
        raise Refused(f"blocked at execution: {messages or ', '.join(codes)}", codes)
    if state is not ActionState.SUCCEEDED:
        raise ActionFailed(outcome_text(details))


def remote_rollback(
    config: CliConfig, action_id: str, reason: str, wait: bool, as_json: bool
) -> None:
    path = _path(action_id, "rollback")
    action = action_from_json(config.remote.client.call("POST", path, {"reason": reason}))
    if not wait:
        click.echo(f"rollback of {action_id} requested ({action.state.value})")
        return
    details = _follow(config, action_id)
    if as_json:
        echo_json(details_json(details, None))
    else:
        click.echo(outcome_text(details))
    if details.action.state is not ActionState.ROLLED_BACK:
        raise ActionFailed(outcome_text(details))
