"""init, catalog list/show, audit verify/export."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from opsgate.audit_documents import decision_documents, verify_document
from opsgate.audit_signing import (
    checkpoint_json,
    generate_keypair,
    load_public_key,
    read_checkpoint_file,
)
from opsgate.catalog import param_json_schema
from opsgate.cli.completion import action_types
from opsgate.cli.context import CliConfig, echo_json, json_format, json_option, pass_config
from opsgate.cli.ids import ACTION_ID
from opsgate.cli.render import console, event_json
from opsgate.errors import ConfigError, InvalidInput, NotFound, OpsgateError, did_you_mean
from opsgate.safe_text import shown


@click.command()
@json_option
@pass_config
def init(config: CliConfig, as_json: bool) -> None:
    """Create or upgrade the store to the newest schema."""
    config.store.migrate()
    if as_json:
        echo_json({"store": _redacted(config.settings.db), "migrated": True})
    else:
        click.echo(f"store ready: {_redacted(config.settings.db)}")


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


@click.group()
def catalog() -> None:
    """The action types that may be proposed."""


@catalog.command("list")
@json_option
@pass_config
def catalog_list(config: CliConfig, as_json: bool) -> None:
    """Action types in OPSGATE_CATALOG."""
    types = list(config.catalog)
    if as_json:
        echo_json(
            [
                {
                    "name": t.name,
                    "risk": t.risk,
                    "reversible": t.reversible,
                    "description": t.description,
                    "params": sorted(t.params),
                }
                for t in types
            ]
        )
        return
    table = Table(title=f"{len(types)} action types", title_justify="left")
    for column in ("name", "risk", "reversible", "params", "description"):
        table.add_column(column, overflow="fold")
    for t in types:
        table.add_row(
            t.name, t.risk, "yes" if t.reversible else "NO", ", ".join(t.params), t.description
        )
    console().print(table)


@catalog.command("show")
@click.argument("name", shell_complete=action_types)
@json_option
@pass_config
def catalog_show(config: CliConfig, name: str, as_json: bool) -> None:
    """One action type: parameters, steps, default verification."""
    if name not in config.catalog.types:
        known = ", ".join(sorted(config.catalog.types)) or "none"
        hint = did_you_mean(name, config.catalog.types)
        raise NotFound(f"no action type {name!r}{hint} (known: {known})")
    action_type = config.catalog.get(name)
    document = action_type.model_dump(mode="json", by_alias=True, exclude_none=True)
    document["reversible"] = action_type.reversible
    document["params"] = {k: param_json_schema(v) for k, v in action_type.params.items()}
    if as_json:
        echo_json(document)
        return
    import yaml

    click.echo(yaml.safe_dump(document, sort_keys=False, width=100))


@catalog.command("lint")
@json_option
@pass_config
def catalog_lint(config: CliConfig, as_json: bool) -> None:
    """Verifications that cannot be met as written; exit 1 if there is one.

    The post-change evidence floor needs the scrape interval: OPSGATE_PROMETHEUS_SCRAPE_INTERVAL,
    else what the configured Prometheus says, else Prometheus's default of 60s.
    """
    from opsgate.catalog import load_catalog
    from opsgate.verification.provider import PROMETHEUS_DEFAULT_SCRAPE_INTERVAL

    interval = config.settings.prometheus_scrape_interval
    source = "OPSGATE_PROMETHEUS_SCRAPE_INTERVAL"
    if interval is None:
        provider = config.optional_provider()
        asked = provider.scrape_interval() if provider is not None else None
        interval, source = (
            (asked, "Prometheus configuration")
            if asked is not None
            else (PROMETHEUS_DEFAULT_SCRAPE_INTERVAL, "Prometheus's default")
        )
    loaded = load_catalog(config.settings.catalog, scrape_interval=interval)
    findings = list(loaded.warnings)
    if as_json:
        echo_json(
            {
                "scrape_interval": interval,
                "scrape_interval_from": source,
                "findings": [
                    {"action_type": f.action_type, "field": f.field, "message": f.message}
                    for f in findings
                ],
            }
        )
    else:
        click.echo(f"scrape interval {interval:g}s ({source})")
        for finding in findings:
            click.echo(str(finding))
        click.echo(f"{len(findings)} finding(s) in {len(loaded)} action types")
    if findings:
        raise SystemExit(1)


@click.group()
def audit() -> None:
    """The hash-chained audit trail."""


class ChainBroken(OpsgateError):
    exit_code = 5


@audit.command("verify")
@click.option(
    "--public-key",
    "public_key_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The audit key's public half: check the signed checkpoints.",
)
@click.option(
    "--checkpoint",
    "checkpoint_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A checkpoint kept outside the database (`audit checkpoint`): prove no cut since.",
)
@json_option
@pass_config
def audit_verify(
    config: CliConfig, public_key_file: Path | None, checkpoint_file: Path | None, as_json: bool
) -> None:
    """Check the hash chain, every event past its head, the signed checkpoints, and that
    every action's state is explained by its events; name what is wrong."""
    public_key = load_public_key(public_key_file) if public_key_file else None
    anchor = read_checkpoint_file(checkpoint_file) if checkpoint_file else None
    if anchor is not None and public_key is None:
        raise InvalidInput("--checkpoint", "needs --public-key to check its signature")
    if config.server_url is not None:
        # Client mode: the server reads the trail and checks it against the public key
        # and checkpoint sent from here (both public: nothing secret leaves this host).
        body: dict[str, Any] = {}
        if public_key_file is not None:
            body["public_key"] = public_key_file.read_text(encoding="utf-8")
        if anchor is not None:
            body["checkpoint"] = checkpoint_json(anchor)
        document = config.remote.audit_verify(body)
    else:
        document = verify_document(config.store, public_key, anchor)
    print_verify(document, as_json)


def print_verify(document: dict[str, Any], as_json: bool) -> None:
    if as_json:
        echo_json({k: v for k, v in document.items() if k not in ("chain_ok", "chain_problem")})
        if not document["ok"]:
            raise SystemExit(ChainBroken.exit_code)
        return
    if document["ok"]:
        signed_through = document.get("signed_through")
        signed = f", signed through seq {signed_through}" if signed_through is not None else ""
        click.echo(f"audit chain ok: {document['events']} events{signed}")
        for note in document.get("notes") or []:
            click.echo(shown(f"note: {note}"))
        return
    problems = [str(p) for p in document.get("problems") or []]
    for problem in problems[1:]:
        click.echo(shown(f"problem: {problem}"), err=True)
    if not document.get("chain_ok", True):
        raise ChainBroken(
            f"audit chain broken at event seq {document['first_bad_seq']} "
            f"(id {document['first_bad_id']}): {document['chain_problem']}"
        )
    raise ChainBroken(f"audit trail check failed: {problems[0] if problems else 'unknown'}")


@audit.command("checkpoint")
@pass_config
def audit_checkpoint(config: CliConfig) -> None:
    """Sign the chain's head now (needs OPSGATE_AUDIT_KEY) and print it as JSON, to keep
    outside the database: `audit verify --checkpoint FILE` proves nothing was cut since."""
    checkpointer = config.checkpointer()
    if checkpointer is None:
        raise ConfigError(
            "OPSGATE_AUDIT_KEY is not set; checkpoints are signed by the worker/server tier"
        )
    checkpoint = checkpointer.sign_head(config.store, datetime.now(UTC))
    echo_json(checkpoint_json(checkpoint))


@audit.command("keygen")
@click.option(
    "--private-key",
    "private_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the private key (mode 0600); give it to workers and the server.",
)
@click.option(
    "--public-key",
    "public_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the public key; give it to whoever verifies.",
)
def audit_keygen(private_path: Path, public_path: Path) -> None:
    """Create the Ed25519 key pair that signs audit checkpoints (never overwrites)."""
    kid = generate_keypair(private_path, public_path)
    click.echo(f"audit key {kid}: private {private_path}, public {public_path}")


@audit.command("export")
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "json"]), help="jsonl (default) or json."
)
@click.option(
    "--action", "action_id", type=ACTION_ID, help="Only this action's events (id or unique prefix)."
)
@json_option
@pass_config
def audit_export(config: CliConfig, fmt: str | None, action_id: str | None, as_json: bool) -> None:
    """Every event with its hashes, in sequence order (--json: one JSON array)."""
    fmt = json_format(fmt, as_json, default="jsonl")
    events = (event_json(e) for e in config.store.audit_events(action_id=action_id))
    if fmt == "json":
        echo_json(list(events))
        return
    for event in events:
        click.echo(json.dumps(event, sort_keys=True, separators=(",", ":"), default=str))


@audit.command("decisions")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["opa-jsonl", "jsonl"]),
    default="opa-jsonl",
    show_default=True,
    help="opa-jsonl: OPA's decision-log shape; jsonl: opsgate's own.",
)
@click.option("--since", default="30d", show_default=True, help="A duration back, or a date.")
@click.option("--until", default=None, help="A duration back, or a date (default now).")
@pass_config
def audit_decisions(config: CliConfig, fmt: str, since: str, until: str | None) -> None:
    """Every policy decision in the window, one JSON object per line, oldest first."""
    if config.server_url is not None:  # client mode: the server reads them
        documents: Iterable[dict[str, Any]] = config.remote.audit_decisions(fmt, since, until)
    else:
        documents = decision_documents(config.store, fmt, since, until, datetime.now(UTC))
    for document in documents:
        click.echo(json.dumps(document, sort_keys=True, separators=(",", ":"), default=str))
