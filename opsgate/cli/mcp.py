"""opsgate mcp: serve the agent tools over MCP (stdio, or streamable HTTP with --http)."""

from __future__ import annotations

import click

from opsgate.cli.context import CliConfig, pass_config
from opsgate.errors import ConfigError, InvalidInput


@click.command("mcp")
@click.option(
    "--http",
    "http_port",
    type=click.IntRange(0, 65535),
    metavar="PORT",
    help="Serve streamable HTTP at http://HOST:PORT/mcp instead of stdio (0: any free port).",
)
@click.option(
    "--host",
    default=None,
    help="Address to listen on with --http (default 127.0.0.1: this machine only).",
)
@pass_config
def mcp(config: CliConfig, http_port: int | None, host: str | None) -> None:
    """Serve MCP for AI agents: read the catalog, propose, follow. Nothing here approves.

    Every call acts as the agent OPSGATE_AGENT_ID (default sre-agent), never as a human.
    """
    # Imported here: the SDK and its web stack cost a second at start-up, and only
    # this command needs them.
    import anyio

    from opsgate import mcp_server

    if host is not None and http_port is None:
        raise InvalidInput("--host", "only meaningful with --http PORT")
    tools: mcp_server.AgentTools
    if config.remote is not None:
        # Through `opsgate server`: the agent is whoever the token says; no database here.
        tools = mcp_server.RemoteAgentTools(config.app, config.remote)
    else:
        if config.settings.db.split(":", 1)[0].startswith("postgres"):
            # A shared store: the agent's name would be whatever OPSGATE_AGENT_ID says.
            raise ConfigError(
                "opsgate mcp on a PostgreSQL store is refused: the agent's identity would be "
                "self-asserted (OPSGATE_AGENT_ID); set OPSGATE_URL and an agent token "
                "(`opsgate token create --kind agent`) to go through `opsgate server`"
            )
        tools = mcp_server.AgentTools(config.app, mcp_server.agent_identity())
    identity = tools.identity
    tools.open()
    server = mcp_server.build_server(tools)
    try:
        if http_port is None:
            mcp_server.announce(f"serving stdio as agent {identity.id}")
            anyio.run(mcp_server.serve_stdio, server)
            return
        host = host or "127.0.0.1"
        sock = mcp_server.listen(host, http_port)
        if host not in mcp_server.LOOPBACK_HOSTS:
            mcp_server.announce(
                f"warning: {host} is not loopback and there is no authentication: anyone "
                f"who reaches this port proposes as agent {identity.id}"
            )
        mcp_server.announce(
            f"serving streamable HTTP on {mcp_server.http_url(sock)} as agent {identity.id}"
        )
        with sock:
            anyio.run(mcp_server.serve_http, server, sock, host)
    except KeyboardInterrupt:
        # Ctrl-C is how an operator stops a foreground server: not an error.
        return
