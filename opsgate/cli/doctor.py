"""doctor: is this opsgate set up to work? Policy engine, store, catalog, Prometheus."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from opsgate.cli.context import CliConfig, echo_json, json_option, pass_config
from opsgate.cli.render import shown
from opsgate.errors import OpsgateError
from opsgate.shared import one_line
from opsgate.store.base import StoreError


@dataclass
class Check:
    """One line of the report; `ok` None means "not configured" (neither pass nor fail)."""

    name: str
    ok: bool | None
    detail: str
    required: bool = True
    facts: dict[str, Any] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        return {"ok": self.ok, "required": self.required, "detail": self.detail, **self.facts}


def mask_url(url: str) -> str:
    """A database URL with its password masked (the user stays: it helps diagnosis)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        scheme, sep, rest = url.partition("://")
        return f"{scheme}{sep}***@{rest.split('@', 1)[1]}" if "@" in rest else url


def _detail(error: object) -> str:
    return one_line(error, limit=None) or "unknown error"


def check_engine(config: CliConfig) -> Check:
    """Which engine, its health and the bundle revision it would use now."""
    settings = config.settings
    facts: dict[str, Any] = {"engine": settings.policy_engine, "policies": str(settings.policies)}
    if settings.policy_engine == "opa":
        facts.update(mode=settings.opa_mode, url=settings.opa_url)
    try:
        engine = config.engine
    except OpsgateError as exc:
        return Check("policy engine", False, _detail(exc), facts=facts)
    # The OPA engine holds HTTP sessions: close them when the command ends.
    close: Callable[[], None] | None = getattr(engine, "close", None)
    if close is not None:
        click.get_current_context().call_on_close(close)
    health = getattr(engine, "health", None)
    describe = getattr(engine, "describe", None)
    if callable(describe):
        facts.update(describe())
    if callable(health):
        ok, detail = health()
        facts["revision"] = engine.revision()
        return Check("policy engine", ok, detail, facts=facts)
    # The embedded engine: a bundle that does not compile has no revision.
    revision = engine.revision()
    facts["revision"] = revision
    if not revision:
        from opsgate.policies.engine import DECISION_RULE
        from opsgate.policies.opa import PROBE_INPUT

        error = engine.evaluate(DECISION_RULE, PROBE_INPUT).error or "the bundle does not compile"
        return Check("policy engine", False, _detail(error), facts=facts)
    return Check("policy engine", True, f"{settings.policies} compiles", facts=facts)


def _sqlite_file(url: str) -> Path | None:
    """The database file of an sqlite URL, so doctor never creates one by connecting."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or not database or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def check_store(config: CliConfig) -> Check:
    """Reachable, and at the newest schema revision (else: run `opsgate init`)."""
    url = config.settings.db
    facts: dict[str, Any] = {"url": mask_url(url), "migrated": False}
    sqlite_file = _sqlite_file(url)
    if sqlite_file is not None and not sqlite_file.exists():
        detail = f"{sqlite_file} does not exist; run `opsgate init`"
        return Check("store", False, detail, facts=facts)
    try:
        store = config.store
        from opsgate.store.sql import SqlStore

        if not isinstance(store, SqlStore):
            facts["migrated"] = True
            return Check("store", True, "in-memory store (tests only)", facts=facts)
        current, heads = _schema_revisions(store)
    except StoreError as exc:
        return Check("store", False, _detail(exc), facts=facts)
    except Exception as exc:  # a driver error type the store did not translate
        return Check("store", False, f"{type(exc).__name__}: {_detail(exc)}", facts=facts)
    facts.update(schema=sorted(current), newest=sorted(heads))
    if current == heads:
        facts["migrated"] = True
        return Check("store", True, f"migrated (schema {', '.join(sorted(current))})", facts=facts)
    if not current:
        return Check("store", False, "not migrated: run `opsgate init`", facts=facts)
    return Check(
        "store",
        False,
        f"schema {', '.join(sorted(current))}, newest {', '.join(sorted(heads))}: "
        "run `opsgate init` (or upgrade opsgate if the database is newer)",
        facts=facts,
    )


def _schema_revisions(store: Any) -> tuple[set[str], set[str]]:
    """(revisions the database is at, newest revisions this opsgate ships), via alembic."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy.exc import SQLAlchemyError

    from opsgate.store.sql import alembic_config

    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    try:
        with store.engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    except SQLAlchemyError as exc:
        raise store.store_error(exc) from None
    return current, heads


def check_catalog(config: CliConfig) -> Check:
    directory = config.settings.catalog
    facts: dict[str, Any] = {"path": str(directory)}
    try:
        count = len(config.catalog)
    except OpsgateError as exc:
        return Check("catalog", False, _detail(exc), facts=facts)
    facts["action_types"] = count
    if count == 0:
        return Check("catalog", False, f"{directory} has no action types", facts=facts)
    warnings = [str(w) for w in config.catalog.warnings]
    facts["warnings"] = warnings
    detail = f"{directory}: {count} action types"
    if warnings:
        detail += f"; {len(warnings)} warning(s), see `opsgate catalog lint`: {warnings[0]}"
    return Check("catalog", True, detail, facts=facts)


def check_prometheus(config: CliConfig) -> Check:
    """Required when configured; without it nothing can run, but proposals still work."""
    url = config.settings.prometheus_url
    if not url:
        return Check(
            "prometheus",
            None,
            "not configured (OPSGATE_PROMETHEUS_URL): actions can be proposed and approved, "
            "but nothing runs without verification signals",
            required=False,
        )
    facts: dict[str, Any] = {"url": url}
    try:
        provider = config.optional_provider()
    except OpsgateError as exc:
        return Check("prometheus", False, _detail(exc), facts=facts)
    assert provider is not None
    health = provider.check_health()
    return Check("prometheus", health.ok, _detail(health.detail), facts=facts)


CHECKS: tuple[Callable[[CliConfig], Check], ...] = (
    check_engine,
    check_store,
    check_catalog,
    check_prometheus,
)


@click.command()
@json_option
@pass_config
def doctor(config: CliConfig, as_json: bool) -> None:
    """Check the policy engine, store, catalog and Prometheus; exit 1 if one is unhealthy.

    With OPSGATE_POLICY_ENGINE=opa and OPSGATE_OPA_MODE=push this uploads the bundle to
    OPA, as every command that starts the engine does.
    """
    checks = [check(config) for check in CHECKS]
    failed = [c.name for c in checks if c.required and c.ok is not True]
    if as_json:
        echo_json(
            {
                "ok": not failed,
                "checks": {c.name.replace(" ", "_"): c.json() for c in checks},
            }
        )
    else:
        for c in checks:
            mark = "--" if c.ok is None else ("ok" if c.ok else "FAIL")
            label = c.name
            if c.name == "policy engine":
                engine = c.facts.get("engine", "?")
                label = f"{c.name} ({engine}{', ' + c.facts['mode'] if 'mode' in c.facts else ''})"
            click.echo(f"{mark:<5} {label:<28} {shown(c.detail)}")
            revision = c.facts.get("revision")
            if c.name == "policy engine" and revision:
                click.echo(f"{'':<5} {'':<28} bundle revision {revision}")
    if failed:
        if not as_json:
            click.echo(
                f"error: unhealthy: {', '.join(failed)}; fix the lines marked FAIL", err=True
            )
        raise SystemExit(1)
