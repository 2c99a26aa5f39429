"""server, token create/list/revoke: the API and the credentials for it (server side)."""

from __future__ import annotations

import ipaddress
import signal
import socket
from datetime import UTC, datetime
from typing import Any, Literal, cast

import click
from rich.table import Table

from opsgate.auth.tokens import create_token, revoke_token
from opsgate.cli.context import CliConfig, echo_json, json_option, pass_config
from opsgate.cli.render import console, ts
from opsgate.errors import InvalidInput
from opsgate.models import ApiToken, parse_duration


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:PORT` for IPv6); HOST must be an IP address."""
    host, sep, port_text = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidInput("--listen", f"expected HOST:PORT, got {value!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise InvalidInput("--listen", f"expected an IP address, got {host!r}") from None
    return host, int(port_text)


class _Terminated(Exception):
    """SIGTERM, raised where the server runs so that its shutdown runs too."""


def _terminated(_signum: int, _frame: object) -> None:
    raise _Terminated


def bind_listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything says it listens: a port in use is one
    line naming --listen and exit 2, not a traceback after a false "listening"."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As uvicorn would: a restart must not wait out TIME_WAIT on the old connections.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or type(exc).__name__
        raise InvalidInput("--listen", f"cannot listen on {host}:{port}: {reason}") from None
    return sock


@click.command()
@click.option(
    "--listen",
    default="127.0.0.1:8700",
    show_default=True,
    help="Address to serve on; put TLS in front (a reverse proxy) beyond loopback.",
)
@pass_config
def server(config: CliConfig, listen: str) -> None:
    """Serve the HTTP API (/api/v1): the one writer to the store for people, agents and CI.

    Holds the database credentials; clients hold only API tokens (OPSGATE_URL,
    OPSGATE_TOKEN). Ctrl-C or SIGTERM stops it.
    """
    import uvicorn  # only the server pays for the ASGI stack

    from opsgate.server.app import create_app

    host, port = parse_listen(listen)
    # Fail at start, not on the first request: the store, catalog and bundle must load.
    config.store.audit_head()
    config.gate  # noqa: B018  (builds catalog, engine and gate now)
    app = create_app(config.app)
    settings = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        server_header=False,
        lifespan="off",
        # The peer address decides rate limits and proxy trust: never from X-Forwarded-For.
        proxy_headers=False,
    )
    sock = bind_listen(host, port)
    click.echo(f"opsgate server listening on http://{listen}/api/v1", err=True)
    if config.settings.console_client_id:
        click.echo(f"web console at http://{listen}/console", err=True)
    # uvicorn re-raises the stop signal once it has drained; under the default SIGTERM
    # disposition that killed the process before the handover below could run.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        app.state.start()  # notification delivery from the outbox
        uvicorn.Server(settings).run(sockets=[sock])
    except (KeyboardInterrupt, _Terminated):
        pass  # a stop asked for; uvicorn has finished the requests in flight
    finally:
        app.state.close()  # actions it runs are handed over, as a worker does
        sock.close()
        signal.signal(signal.SIGTERM, previous)
    click.echo("opsgate server stopped", err=True)


@click.group()
def token() -> None:
    """API tokens for `opsgate server` (run where the database is: an admin's tool)."""


def _ttl(value: str | None) -> float | None:
    if value is None or value == "never":
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise InvalidInput("--ttl", str(exc)) from None
    return seconds


def _token_json(record: ApiToken, now: datetime) -> dict[str, Any]:
    return {
        "id": record.id,
        "principal": record.principal,
        "kind": record.kind,
        "groups": list(record.groups),
        "status": record.status(now),
        "created_at": ts(record.created_at),
        "created_by": record.created_by,
        "expires_at": ts(record.expires_at),
        "revoked_at": ts(record.revoked_at),
        "revoked_by": record.revoked_by,
    }


@token.command("create")
@click.option("--principal", required=True, help="Who the token acts as, e.g. sre-agent.")
@click.option("--kind", type=click.Choice(["human", "agent"]), default="agent", show_default=True)
@click.option("--group", "groups", multiple=True, help="A group (role) of the principal.")
@click.option("--ttl", default="30d", show_default=True, help="Lifetime, e.g. 12h, 30d; `never`.")
@json_option
@pass_config
def token_create(
    config: CliConfig,
    principal: str,
    kind: str,
    groups: tuple[str, ...],
    ttl: str,
    as_json: bool,
) -> None:
    """Issue a token; it is printed once and only its hash is kept."""
    admin = config.identity()
    issued = create_token(
        config.store,
        principal=principal,
        kind=cast(Literal["human", "agent"], kind),
        groups=groups,
        ttl=_ttl(ttl),
        created_by=admin.id,
    )
    if as_json:
        echo_json({**_token_json(issued.record, datetime.now(UTC)), "token": issued.plaintext})
        return
    expires = ts(issued.record.expires_at) if issued.record.expires_at else "never"
    click.echo(
        f"token {issued.record.id} for {principal} ({kind}), expires {expires}; "
        "it is shown only now:",
        err=True,
    )
    click.echo(issued.plaintext)


@token.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include revoked and expired tokens.")
@json_option
@pass_config
def token_list(config: CliConfig, show_all: bool, as_json: bool) -> None:
    """Tokens (never their secrets)."""
    now = datetime.now(UTC)
    rows = [_token_json(t, now) for t in config.store.list_api_tokens()]
    if not show_all:
        rows = [r for r in rows if r["status"] == "active"]
    if as_json:
        echo_json(rows)
        return
    table = Table(title=f"{len(rows)} token(s)", title_justify="left")
    for column in ("id", "principal", "kind", "groups", "status", "expires", "created by"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            row["id"],
            row["principal"],
            row["kind"],
            ",".join(row["groups"]) or "-",
            row["status"],
            row["expires_at"] or "never",
            row["created_by"],
        )
    console().print(table)


@token.command("revoke")
@click.argument("token_id")
@json_option
@pass_config
def token_revoke(config: CliConfig, token_id: str, as_json: bool) -> None:
    """Revoke a token now; requests with it get 401 from then on."""
    if len(token_id) > 64 or not token_id.isalnum():
        raise InvalidInput("token_id", "expected a token id as `opsgate token list` shows it")
    record = revoke_token(config.store, token_id, revoked_by=config.identity().id)
    if as_json:
        echo_json(_token_json(record, datetime.now(UTC)))
    else:
        click.echo(f"token {record.id} of {record.principal} revoked")


__all__ = ["server", "token"]
