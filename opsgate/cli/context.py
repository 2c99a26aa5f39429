"""The one config object every command gets, built lazily from OPSGATE_* and opsgate.toml."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from opsgate.audit_signing import Checkpointer, load_private_key
from opsgate.catalog import Catalog, load_catalog
from opsgate.config import Settings
from opsgate.errors import ConfigError
from opsgate.gate import Gate
from opsgate.identity import identity_provider
from opsgate.models import Identity
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.policies.engine import PolicyEngine, load_bundle_data
from opsgate.preconditions import PreconditionRegistry, prometheus_checks
from opsgate.store import Store, open_store
from opsgate.verification.prometheus import PrometheusProvider

F = TypeVar("F", bound=Callable[..., Any])


class CliConfig:
    """Settings plus the store, catalog, engine and identity they point at, opened on use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: Store | None = None
        self._catalog: Catalog | None = None
        self._engine: PolicyEngine | None = None
        self._gate: Gate | None = None
        self._provider: PrometheusProvider | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.settings.db)
        return self._store

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
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
                self._engine = EmbeddedEngine(
                    self.settings.policies, timeout=self.settings.policy_timeout
                )
        return self._engine

    @property
    def gate(self) -> Gate:
        if self._gate is None:
            policies = self.settings.policies
            self._gate = Gate(
                store=self.store,
                catalog=self.catalog,
                engine=self.engine,
                approval_ttl=self.settings.approval_ttl,
                decision_deadline=self.settings.decision_deadline,
                freeze_windows=lambda: _freeze_windows(policies),
                preconditions=PreconditionRegistry(prometheus_checks(self.optional_provider())),
                shadow=self.shadow_engine(),
            )
        return self._gate

    def checkpointer(self) -> Checkpointer | None:
        """Signs the audit head when this process holds the key (OPSGATE_AUDIT_KEY)."""
        if self.settings.audit_key is None:
            return None
        return Checkpointer(load_private_key(self.settings.audit_key))

    def shadow_engine(self) -> PolicyEngine | None:
        """The shadow bundle (OPSGATE_SHADOW_POLICIES), always in process: it is advice."""
        directory = self.settings.shadow_policies
        if directory is None:
            return None
        if not directory.is_dir():
            raise ConfigError(f"OPSGATE_SHADOW_POLICIES: {directory} is not a directory")
        return EmbeddedEngine(directory, timeout=self.settings.policy_timeout)

    def optional_provider(self) -> PrometheusProvider | None:
        """The Prometheus signal provider, or None when OPSGATE_PROMETHEUS_URL is unset."""
        url = self.settings.prometheus_url
        if self._provider is None and url:
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

    def identity(self) -> Identity:
        return identity_provider(self.settings, self.store).current()

    def close(self) -> None:
        close_engine = getattr(self._engine, "close", None)
        if callable(close_engine):  # the OPA engine holds HTTP sessions
            close_engine()
        if self._provider is not None:
            self._provider.close()
        if self._store is not None:
            self._store.close()


def _freeze_windows(policies: Path) -> list[Any]:
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


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        func
    )


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))
