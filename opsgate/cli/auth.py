"""whoami: who the server (or, in local mode, this machine) says you are."""

from __future__ import annotations

import click

from opsgate.cli.context import CliConfig, echo_json, json_option, pass_config


@click.command()
@json_option
@pass_config
def whoami(config: CliConfig, as_json: bool) -> None:
    """The principal you act as: id, kind, groups and how that was established."""
    if config.remote is not None:
        answer = dict(config.remote.whoami())
        answer["server"] = config.server_url
    else:
        identity = config.identity()
        answer = {
            "id": identity.id,
            "kind": identity.kind,
            "groups": [],
            "method": f"local ({config.settings.identity})",
            "credential": "",
            "server": None,
        }
    if as_json:
        echo_json(answer)
        return
    groups = ", ".join(answer.get("groups") or []) or "none"
    where = f"via {answer['server']}" if answer["server"] else "local single-user mode"
    click.echo(
        f"{answer['id']} ({answer['kind']}), groups: {groups}; "
        f"authenticated by {answer['method']}, {where}"
    )
