"""The application object: store, gate, policy engines, catalog and signal provider, built
once from Settings for whichever entry point runs (CLI, MCP, the API server, a worker).

Each part opens on first use, so a command pays only for what it touches. The catalog is
re-read under one rule for every long-lived process: when its files change (a stat of
each, at most once per RELOAD_CHECK_SECONDS), and a broken edit keeps the last good
catalog, logged and counted, instead of taking the process down. The policy bundle
follows the same change check inside the engines (opsgate.policies.embedded / opa), but
a broken bundle denies every decision until it is fixed: serving an older policy after
a failed edit could keep a rule its author meant to tighten.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from opsgate.config import Settings
from opsgate.errors import ConfigError
from opsgate.shared import FileSignature, files_signature

if TYPE_CHECKING:  # imported where used: a command pays only for what it opens
    from opsgate.audit_signing import Checkpointer
    from opsgate.catalog import Catalog
    from opsgate.executor.executor import Executor, ExecutorEvent
    from opsgate.gate import Gate
    from opsgate.policies.engine import PolicyEngine
    from opsgate.store import Store
    from opsgate.verification.prometheus import PrometheusProvider

log = logging.getLogger("opsgate.app")

# How often a long-lived process looks at the catalog's files (a stat each); the policy
# engines use the same interval for the bundle.
RELOAD_CHECK_SECONDS = 1.0

T = TypeVar("T")

# The signature of files that cannot be listed or stat'ed (their directory went away).
_UNREADABLE: FileSignature = (("", -1, -1),)


class Reloading(Generic[T]):
    """A value loaded from files, loaded again when their signature changes.

    A failed load with nothing loaded before raises (the caller cannot go on); a failed
    load after a good one keeps the good one, logs the error once per broken edit and
    counts it in `failures`. `error` is the last failure's message until a load succeeds.
    """

    def __init__(
        self,
        what: str,
        files: Callable[[], list[Path]],
        load: Callable[[], T],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self._files = files
        self._load = load
        self._clock = clock
        self._lock = threading.Lock()
        self._value: T | None = None
        self._signature: FileSignature | None = None
        self._failed: FileSignature | None = None  # the edit that did not load
        self._checked_at = 0.0
        self.failures = 0
        self.error: str | None = None

    def _signature_now(self) -> FileSignature:
        try:
            return files_signature(self._files())
        except OSError:
            return _UNREADABLE  # a directory that went away: the load names the problem

    def __call__(self) -> T:
        with self._lock:
            now = self._clock()
            if self._value is not None and now - self._checked_at < RELOAD_CHECK_SECONDS:
                return self._value
            self._checked_at = now
            # Taken before reading, so an edit made during the load is seen next time.
            signature = self._signature_now()
            if self._value is not None and signature in (self._signature, self._failed):
                return self._value
            try:
                value = self._load()
            except Exception as exc:  # whatever the new files do, the last good one stands
                if self._value is None:
                    raise
                self.failures += 1
                log.error("%s not reloaded, still serving the last good one: %s", self.what, exc)
                self._failed = signature
                self.error = str(exc)
                return self._value
            self._value, self._signature = value, signature
            self._failed, self.error = None, None
            return value


class App:
    """Settings plus everything they point at, opened on use and shared by the threads of
    one process. Entry points are adapters over it: opsgate.cli (CliConfig),
    opsgate.mcp_server (AgentTools) and opsgate.server.app (Api)."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._lock = threading.RLock()
        self._store: Store | None = None
        self._engine: PolicyEngine | None = None
        self._shadow: PolicyEngine | None = None
        self._gate: Gate | None = None
        self._provider: PrometheusProvider | None = None
        self.catalogs: Reloading[Catalog] = Reloading(
            "catalog", self._catalog_files, self._load_catalog, clock=clock
        )

    # --- the catalog -----------------------------------------------------------------

    def _catalog_files(self) -> list[Path]:
        from opsgate.catalog import catalog_files

        return catalog_files(self.settings.catalog)

    def _load_catalog(self) -> Catalog:
        from opsgate.catalog import load_catalog

        return load_catalog(
            self.settings.catalog,
            strict=self.settings.catalog_strict,
            scrape_interval=self.settings.prometheus_scrape_interval,
        )

    def catalog(self) -> Catalog:
        """Today's catalog: reloaded when its files change, the last good one while an
        edit does not load. InvalidInput when no version of it has loaded yet."""
        return self.catalogs()

    # --- store, engines, gate ----------------------------------------------------------

    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                from opsgate.store import open_store

                self._store = open_store(self.settings.db)
            return self._store

    @property
    def engine(self) -> PolicyEngine:
        with self._lock:
            if self._engine is None:
                self._engine = self._open_engine()
            return self._engine

    def _open_engine(self) -> PolicyEngine:
        settings = self.settings
        if not settings.policies.is_dir():
            raise ConfigError(
                f"policy bundle {settings.policies} is not a directory (set OPSGATE_POLICIES)"
            )
        if settings.policy_engine == "opa":
            from opsgate.policies.opa import OpaEngine  # only teams with OPA pay for it

            if not settings.opa_url:
                raise ConfigError("OPSGATE_POLICY_ENGINE=opa needs OPSGATE_OPA_URL")
            return OpaEngine(
                settings.opa_url,
                mode=settings.opa_mode,
                policies=settings.policies,
                token=settings.opa_token,
                ca_file=settings.opa_ca_file,
                timeout=settings.opa_timeout,
            )
        if settings.policy_engine == "opa-embedded":
            from opsgate.policies.embedded import OpaEmbeddedEngine

            return OpaEmbeddedEngine(settings.policies, timeout=settings.policy_timeout)
        from opsgate.policies.embedded import EmbeddedEngine

        return EmbeddedEngine(settings.policies, timeout=settings.policy_timeout)

    def shadow_engine(self) -> PolicyEngine | None:
        """The shadow bundle (OPSGATE_SHADOW_POLICIES), always in process: it is advice."""
        directory = self.settings.shadow_policies
        if directory is None:
            return None
        with self._lock:
            if self._shadow is None:
                if not directory.is_dir():
                    raise ConfigError(f"OPSGATE_SHADOW_POLICIES: {directory} is not a directory")
                from opsgate.policies.embedded import EmbeddedEngine

                self._shadow = EmbeddedEngine(directory, timeout=self.settings.policy_timeout)
            return self._shadow

    @property
    def gate(self) -> Gate:
        """The gate over today's catalog; store, engines and preconditions are built once
        and shared by every copy."""
        catalog = self.catalog()
        with self._lock:
            if self._gate is None:
                self._gate = self._build_gate(catalog)
            elif self._gate.catalog is not catalog:
                self._gate = dataclasses.replace(self._gate, catalog=catalog)
            return self._gate

    def _build_gate(self, catalog: Catalog) -> Gate:
        from opsgate.gate import Gate
        from opsgate.policies.engine import bundle_environments, bundle_freeze_windows
        from opsgate.preconditions import PreconditionRegistry, prometheus_checks

        policies = self.settings.policies
        return Gate(
            store=self.store,
            catalog=catalog,
            engine=self.engine,
            approval_ttl=self.settings.approval_ttl,
            track_record_window=self.settings.track_record_window,
            decision_deadline=self.settings.decision_deadline,
            freeze_windows=lambda: bundle_freeze_windows(policies),
            environments=lambda: None if self._external_opa() else bundle_environments(policies),
            preconditions=PreconditionRegistry(prometheus_checks(self.optional_provider())),
            shadow=self.shadow_engine(),
        )

    def _external_opa(self) -> bool:
        # OPA in external mode decides with its own data: the local bundle may differ.
        return self.settings.policy_engine == "opa" and self.settings.opa_mode == "external"

    # --- signals, signing, execution -----------------------------------------------

    def optional_provider(self) -> PrometheusProvider | None:
        """The Prometheus signal provider, or None when OPSGATE_PROMETHEUS_URL is unset."""
        url = self.settings.prometheus_url
        if not url:
            return None
        with self._lock:
            if self._provider is None:
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

    def checkpointer(self) -> Checkpointer | None:
        """Signs the audit head when this process holds the key (OPSGATE_AUDIT_KEY)."""
        if self.settings.audit_key is None:
            return None
        from opsgate.audit_signing import Checkpointer, load_private_key

        return Checkpointer(load_private_key(self.settings.audit_key))

    def build_executor(
        self,
        on_event: Callable[[ExecutorEvent], None] | None = None,
        *,
        concurrency: int | None = None,
        worker_id: str | None = None,
    ) -> Executor:
        """A worker's executor (`opsgate run`/`worker`/`rollback`, and the API server's)."""
        from opsgate.executor.executor import Executor
        from opsgate.executor.runners import RunnerRegistry

        # The catalog is read per claim through the reload rule: an edit reaches the next
        # action without a restart (and an approval bound to the old spec is refused).
        return Executor(
            self.store,
            self.gate,
            self.provider(),
            RunnerRegistry(),
            catalog=self.catalog,
            lease=self.settings.lease,
            concurrency=concurrency or self.settings.worker_concurrency,
            scrape_interval=self.settings.prometheus_scrape_interval,
            on_event=on_event,
            worker_id=worker_id,
        )

    def close(self) -> None:
        with self._lock:
            for engine in (self._engine, self._shadow):
                close_engine = getattr(engine, "close", None)
                if callable(close_engine):  # worker processes, HTTP sessions
                    close_engine()
            if self._provider is not None:
                self._provider.close()
            if self._store is not None:
                self._store.close()
