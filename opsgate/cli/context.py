"""The one config object every command gets, built lazily from OPSGATE_* and opsgate.toml."""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

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
    """Settings plus the store, catalog, engine and identity they point at, opened on use.

    With OPSGATE_URL set (client mode) the action commands go through `opsgate server`
    with OPSGATE_TOKEN, and nothing here opens a store: only the server and workers do.
    Both are read from the environment alone, never from a file in the working directory.
    """

    def __init__(self, settings: Settings, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.settings = settings
        self.server_url = env.get("OPSGATE_URL") or None
        self._server_token = env.get("OPSGATE_TOKEN") or None
        self._remote: Any = None
        self._store: Store | None = None
        self._catalog: Catalog | None = None
        self._engine: PolicyEngine | None = None
        self._gate: Gate | None = None
        self._provider: PrometheusProvider | None = None

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
        if self._store is None:
            from opsgate.store import open_store

            self._store = open_store(self.settings.db)
        return self._store

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            from opsgate.catalog import load_catalog

            self._catalog = load_catalog(
                self.settings.catalog,
                strict=self.settings.catalog_strict,
                scrape_interval=self.settings.prometheus_scrape_interval,
            )
        return self._catalog

    @property
    def engine(self) -> PolicyEngine:
        if self._engine is None:
            if not self.settings.policies.is_dir():
                raise ConfigError(
                    f"policy bundle {self.settings.policies} is not a directory "
                    "(set OPSGATE_POLICIES)"
                )
            if self.settings.policy_engine == "opa":
                from opsgate.policies.opa import OpaEngine  # only teams with OPA pay for it

                settings = self.settings
                if not settings.opa_url:
                    raise ConfigError("OPSGATE_POLICY_ENGINE=opa needs OPSGATE_OPA_URL")
                self._engine = OpaEngine(
                    settings.opa_url,
                    mode=settings.opa_mode,
                    policies=settings.policies,
                    token=settings.opa_token,
                    ca_file=settings.opa_ca_file,
                    timeout=settings.opa_timeout,
                )
            elif self.settings.policy_engine == "opa-embedded":
                from opsgate.policies.embedded import OpaEmbeddedEngine

                self._engine = OpaEmbeddedEngine(
                    self.settings.policies, timeout=self.settings.policy_timeout
                )
            else:
                from opsgate.policies.embedded import EmbeddedEngine

                self._engine = EmbeddedEngine(
                    self.settings.policies, timeout=self.settings.policy_timeout
                )
        return self._engine

    @property
    def gate(self) -> Gate:
        if self._gate is None:
            from opsgate.gate import Gate
            from opsgate.preconditions import PreconditionRegistry, prometheus_checks

            policies = self.settings.policies
            self._gate = Gate(
                store=self.store,
                catalog=self.catalog,
                engine=self.engine,
                approval_ttl=self.settings.approval_ttl,
                decision_deadline=self.settings.decision_deadline,
                freeze_windows=lambda: _freeze_windows(policies),
                environments=lambda: (
                    None if self._external_opa() else bundle_environments(policies)
                ),
                preconditions=PreconditionRegistry(prometheus_checks(self.optional_provider())),
                shadow=self.shadow_engine(),
            )
        return self._gate

    def _external_opa(self) -> bool:
        # OPA in external mode decides with its own data: the local bundle may differ.
        return self.settings.policy_engine == "opa" and self.settings.opa_mode == "external"

    def checkpointer(self) -> Checkpointer | None:
        """Signs the audit head when this process holds the key (OPSGATE_AUDIT_KEY)."""
        if self.settings.audit_key is None:
            return None
        from opsgate.audit_signing import Checkpointer, load_private_key

        return Checkpointer(load_private_key(self.settings.audit_key))

    def shadow_engine(self) -> PolicyEngine | None:
        """The shadow bundle (OPSGATE_SHADOW_POLICIES), always in process: it is advice."""
        directory = self.settings.shadow_policies
        if directory is None:
            return None
        if not directory.is_dir():
            raise ConfigError(f"OPSGATE_SHADOW_POLICIES: {directory} is not a directory")
        from opsgate.policies.embedded import EmbeddedEngine

        return EmbeddedEngine(directory, timeout=self.settings.policy_timeout)

    def optional_provider(self) -> PrometheusProvider | None:
        """The Prometheus signal provider, or None when OPSGATE_PROMETHEUS_URL is unset."""
        url = self.settings.prometheus_url
        if self._provider is None and url:
            from opsgate.verification.prometheus import PrometheusProvider

            settings = self.settings
            basic = None
            if settings.prometheus_user is not None:
                basic = (settings.prometheus_user, settings.prometheus_password or "")
            try:
                self._provider = PrometheusProvider(
                    url,
                    token=settings.prometheus_token,
                    basic_auth=basic,
                    ca_file=settings.prometheus_ca_file,
                    timeout=settings.prometheus_timeout,
                )
            except ValueError as exc:
                raise ConfigError(f"OPSGATE_PROMETHEUS_URL: {exc}") from None
        return self._provider

    def provider(self) -> PrometheusProvider:
        """The provider verification needs; without it nothing may run (fail closed)."""
        provider = self.optional_provider()
        if provider is None:
            raise ConfigError(
                "OPSGATE_PROMETHEUS_URL is not set; opsgate runs nothing it cannot verify"
            )
        return provider

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
        close_engine = getattr(self._engine, "close", None)
        if callable(close_engine):  # the OPA engine holds HTTP sessions
            close_engine()
        if self._provider is not None:
            self._provider.close()
        if self._store is not None:
            self._store.close()


def bundle_environments(policies: Path) -> frozenset[str] | None:
    """Environments the bundle's data names (allowlist, propose_roles, approver_roles
    keys), or None when it names none or cannot be read: then policy alone decides (and
    fails closed on unreadable data)."""
    from opsgate.policies.engine import load_bundle_data

    try:
        data = load_bundle_data(policies)
    except (OSError, ValueError):
        return None
    names: set[str] = set()
    for table in ("allowlist", "propose_roles", "approver_roles"):
        entries = data.get(table)
        if isinstance(entries, dict):
            names.update(str(k) for k in entries if k != "default")
    return frozenset(names) or None


def _freeze_windows(policies: Path) -> list[Any]:
    from opsgate.policies.engine import load_bundle_data

    try:
        windows = load_bundle_data(policies).get("freeze_windows", [])
    except (OSError, ValueError) as exc:
        # Unreadable freeze data must not read as "no freeze": fail closed.
        return [
            {
                "name": f"unreadable freeze data: {exc}",
                "start": "0001-01-01T00:00:00+00:00",
                "end": "9999-12-31T23:59:59+00:00",
                "environments": ["*"],
            }
        ]
    return list(windows) if isinstance(windows, list) else []


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
