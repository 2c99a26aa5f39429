"""`opsgate trust reset`: a human lifts `trust_revoked` for one proposer and action type."""

from __future__ import annotations

import click

from opsgate.cli.context import CliConfig, echo_json, json_option, pass_config
from opsgate.cli.render import ts
from opsgate.models import TrustReset
from opsgate.safe_text import shown
from opsgate.views import trust_reset_json


@click.group()
def trust() -> None:
    """The trust ladder: what a proposer's track record earns it (see the README)."""


@trust.command("reset")
@click.option("--proposer", required=True, help="Whose trust, e.g. sre-agent.")
@click.option("--action-type", "action_type", required=True, help="For which action type.")
@click.option("--reason", required=True, help="Why; goes into the audit trail.")
@json_option
@pass_config
def reset(config: CliConfig, proposer: str, action_type: str, reason: str, as_json: bool) -> None:
    """Lift trust_revoked after a rolled-back run: the proposer may propose the type again
    (back on the ladder where its record puts it). Needs a reset role; recorded and audited.
    With OPSGATE_URL set the server does it, as the principal of your token."""
    record: TrustReset
    if config.server_url is not None:
        record = config.remote.trust_reset(proposer, action_type, reason)
    else:
        from opsgate.trust import reset as reset_trust

        record = reset_trust(config.gate, proposer, action_type, reason, config.identity())
    if as_json:
        echo_json(trust_reset_json(record))
        return
    click.echo(
        f"trust reset for {shown(record.proposer_id)} on {shown(record.action_type)} "
        f"by {shown(record.reset_by)} at {ts(record.at)}"
    )
