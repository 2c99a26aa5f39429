"""whoami and login: who the server (or, in local mode, this machine) says you are."""

from __future__ import annotations

import click

from opsgate.cli.context import CliConfig, echo_json, json_option, pass_config
from opsgate.errors import ConfigError


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


@click.command()
@pass_config
def login(config: CliConfig) -> None:
    """Sign in to OPSGATE_URL with your identity provider (OAuth device authorization
    grant, RFC 8628); the credentials are stored 0600 under your config directory."""
    from opsgate.client.login import device_login

    if config.server_url is None:
        raise ConfigError("opsgate login needs OPSGATE_URL (the opsgate server to sign in to)")
    path, answer = device_login(config.server_url, lambda line: click.echo(line, err=True))
    click.echo(f"signed in as {answer['id']} ({answer['kind']}); credentials in {path}", err=True)
