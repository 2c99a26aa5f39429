"""`opsgate trust reset`: a human lifts `trust_revoked` for one proposer and action type."""

from __future__ import annotations

import click

from opsgate.cli.context import CliConfig, echo_json, json_option, pass_config
from opsgate.cli.render import ts
from opsgate.errors import ConfigError
from opsgate.safe_text import shown


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
    (back on the ladder where its record puts it). Needs a reset role; recorded and audited."""
    if config.server_url is not None:
        raise ConfigError(
            "opsgate trust reset runs against the store, not through OPSGATE_URL; "
            "run it where the store is reachable"
        )
    from opsgate.trust import reset as reset_trust

    record = reset_trust(config.gate, proposer, action_type, reason, config.identity())
    if as_json:
        echo_json(
            {
                "id": record.id,
                "proposer": record.proposer_id,
                "action_type": record.action_type,
                "reset_by": record.reset_by,
                "reason": record.reason,
                "at": ts(record.at),
            }
        )
        return
    click.echo(
        f"trust reset for {shown(record.proposer_id)} on {shown(record.action_type)} "
        f"by {shown(record.reset_by)} at {ts(record.at)}"
    )
