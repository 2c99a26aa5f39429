"""The one config object every command gets, built lazily from OPSGATE_* and opsgate.toml."""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from opsgate.app import App
from opsgate.config import Settings
from opsgate.errors import ConfigError, InvalidInput

if TYPE_CHECKING:  # imported where used: a command pays only for what it opens
    from opsgate.audit_signing import Checkpointer
    from opsgate.catalog import Catalog
    from opsgate.client.service import ActionService
    from opsgate.gate import Gate
    from opsgate.models import Identity
    from opsgate.policies.engine import PolicyEngine
    from opsgate.store import Store
    from opsgate.verification.prometheus import PrometheusProvider

F = TypeVar("F", bound=Callable[..., Any])


class CliConfig:
    """The CLI's adapter over the App (opsgate.app): the same store, catalog, engines and
    gate every entry point uses, plus what only the CLI has, client mode and the OS user.

    With OPSGATE_URL set (client mode) the action commands go through `opsgate server`
    with OPSGATE_TOKEN, and nothing here opens a store: only the server and workers do.
    Both are read from the environment alone, never from a file in the working directory.
    """

    def __init__(self, settings: Settings, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.settings = settings
        self.app = App(settings)
        self.server_url = env.get("OPSGATE_URL") or None
        self._server_token = env.get("OPSGATE_TOKEN") or None
        self._remote: Any = None

    @property
    def remote(self) -> Any:
        """The RemoteGate for OPSGATE_URL (client mode), or None in local mode."""
        if self.server_url is None:
            return None
        if self._remote is None:
            from opsgate.client.http import ApiClient  # only clients pay for it
            from opsgate.client.remote import RemoteGate

            token = self._server_token
            if token is None:
                from opsgate.client import credentials
                from opsgate.client.http import check_url

                token = credentials.access_token(check_url(self.server_url))
            if token is None:
                raise ConfigError(
                    "OPSGATE_URL is set but there is no credential: set OPSGATE_TOKEN or run "
                    "`opsgate login`"
                )
            self._remote = RemoteGate(ApiClient(self.server_url, token))
        return self._remote

    @property
    def actions(self) -> ActionService:
        """propose/queue/show/approve/reject/cancel: the server in client mode, else the
        local gate; the same Gate code decides either way."""
        remote = self.remote
        return remote if remote is not None else self.gate

    @property
    def render_catalog(self) -> Catalog | None:
        """The catalog for masking output; none in client mode (the server masked it) or
        when today's catalog does not load (history must stay readable)."""
        if self.server_url is not None:
            return None
        try:
            return self.catalog
        except InvalidInput:
            return None

    @property
    def store(self) -> Store:
        if self.server_url is not None:
            raise ConfigError(
                "OPSGATE_URL is set: this command needs the database, which only the server "
                "and workers hold; run it there (without OPSGATE_URL)"
            )
        return self.app.store

    @property
    def catalog(self) -> Catalog:
        return self.app.catalog()

    @property
    def engine(self) -> PolicyEngine:
        return self.app.engine

    @property
    def gate(self) -> Gate:
        self.store  # noqa: B018 - refused in client mode before anything opens
        return self.app.gate

    def checkpointer(self) -> Checkpointer | None:
        return self.app.checkpointer()

    def shadow_engine(self) -> PolicyEngine | None:
        return self.app.shadow_engine()

    def optional_provider(self) -> PrometheusProvider | None:
        return self.app.optional_provider()

    def provider(self) -> PrometheusProvider:
        return self.app.provider()

    def expire_due(self) -> None:
        """Expire what is past its approval window (the store alone: no catalog, no
        policy engine), so what a read shows is true now."""
        from datetime import UTC, datetime

        from opsgate.lifecycle import expire_due

        expire_due(self.store, datetime.now(UTC))

    def identity(self) -> Identity:
        if self.server_url is not None:
            if self.settings.identity != "os":
                raise ConfigError(
                    f"OPSGATE_IDENTITY={self.settings.identity} is refused when OPSGATE_URL "
                    "is set: the server tells who you are from your token"
                )
            from opsgate.models import Identity as IdentityModel

            answer = self.remote.whoami()
            return IdentityModel.model_validate(
                {"id": answer.get("id"), "kind": answer.get("kind")}
            )
        from opsgate.identity import identity_provider

        return identity_provider(self.settings, self.store).current()

    def close(self) -> None:
        if self._remote is not None:
            self._remote.client.close()
        self.app.close()


def pass_config(func: F) -> F:
    """Give a command the shared CliConfig as its first argument."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        return func(ctx.find_object(CliConfig), *args, **kwargs)

    return cast(F, wrapper)


class _OutputMode:
    """Whether this invocation asked for --json: errors then go out as JSON too."""

    json = False


output_mode = _OutputMode()


def _remember_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        output_mode.json = True
    return value


def json_option(func: F) -> F:
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        is_eager=True,
        callback=_remember_json,
        help="Print JSON instead of a table (errors too, on stderr).",
    )(func)


def json_format(fmt: str | None, as_json: bool, *, default: str) -> str:
    """--json is --format json; asking for both JSON and another format is a mistake."""
    if as_json and fmt not in (None, "json"):
        raise InvalidInput("--json", f"conflicts with --format {fmt}")
    return "json" if as_json else (fmt or default)


def finite_seconds(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """A click callback for FloatRange options, which let NaN through (every comparison
    with it is false): a sleep of NaN seconds would crash mid-way."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds", ctx=ctx, param=param)
    return value


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))
