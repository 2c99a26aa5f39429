"""context list/current/use/show/set/delete: named settings in the user's config file."""

from __future__ import annotations

import click
from rich.markup import escape
from rich.table import Table

from opsgate.cli.context import echo_json, json_option
from opsgate.cli.render import console
from opsgate.config import Settings
from opsgate.contexts import (
    check_entry,
    check_name,
    config_path,
    load,
    masked,
    save,
)
from opsgate.errors import ConfigError, InvalidInput, NotFound


@click.group()
def context() -> None:
    """Named contexts (store, catalog, bundle, Prometheus) in your config file."""


@context.command("list")
@json_option
def context_list(as_json: bool) -> None:
    """Every context; the current one is marked."""
    config = load()
    rows: list[dict[str, object]] = [
        {"name": name, "current": name == config.current, "settings": masked(values)}
        for name, values in sorted(config.contexts.items())
    ]
    if as_json:
        echo_json({"file": str(config.path), "current": config.current, "contexts": rows})
        return
    if not rows:
        click.echo(f"no contexts in {config.path}; add one with `opsgate context set NAME db=...`")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("CURRENT", "NAME", "DB", "PROMETHEUS", "POLICIES"):
        table.add_column(column, overflow="fold")
    for name, values in sorted(config.contexts.items()):
        settings = masked(values)
        table.add_row(
            "*" if name == config.current else "",
            escape(name),
            escape(settings.get("db", "-")),
            escape(settings.get("prometheus_url", "-")),
            escape(settings.get("policies", "-")),
        )
    console().print(table)


@context.command("current")
@json_option
def context_current(as_json: bool) -> None:
    """The name of the current context (exit 4 when none is set)."""
    config = load()
    if config.current is None:
        raise NotFound(f"no current context in {config.path}; `opsgate context use NAME`")
    if as_json:
        echo_json({"current": config.current, "file": str(config.path)})
    else:
        click.echo(config.current)


@context.command("use")
@click.argument("name")
def context_use(name: str) -> None:
    """Make NAME the current context."""
    config = load()
    config.get(check_name(name))
    config.current = name
    save(config)
    click.echo(f"now using context {name}")


@context.command("show")
@click.argument("name", required=False)
@json_option
def context_show(name: str | None, as_json: bool) -> None:
    """The settings of NAME (default: the current context); secrets are masked."""
    config = load()
    name = name or config.current
    if name is None:
        raise NotFound(f"no current context in {config.path}; name one")
    values = masked(config.get(check_name(name)))
    if as_json:
        echo_json({"name": name, "current": name == config.current, "settings": values})
        return
    for key, value in sorted(values.items()):
        click.echo(f"{key} = {value}")


@context.command("set")
@click.argument("name")
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
def context_set(name: str, pairs: tuple[str, ...]) -> None:
    """Create or update context NAME, e.g. `opsgate context set prod db=postgresql://...`.

    Keys are settings without the OPSGATE_ prefix, lower case (db, catalog, policies,
    prometheus_url, ...); `KEY=` removes one. Identity settings are refused.
    """
    check_name(name)
    config = load()
    values = dict(config.contexts.get(name, {}))
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput("KEY=VALUE", f"expected KEY=VALUE, got {pair!r}")
        if value == "":
            values.pop(key, None)
            continue
        try:
            values[key] = check_entry(key, value, f"context {name}")
        except ConfigError as exc:
            raise InvalidInput(key, str(exc)) from None
    try:  # the values must make valid settings (durations, engine names, ...)
        Settings().with_overrides(values)
    except ConfigError as exc:
        raise InvalidInput(name, str(exc)) from None
    config.contexts[name] = values
    save(config)
    click.echo(f"context {name} saved in {config.path}")


@context.command("delete")
@click.argument("name")
def context_delete(name: str) -> None:
    """Remove context NAME (and make none current if it was)."""
    config = load()
    config.get(check_name(name))
    del config.contexts[name]
    if config.current == name:
        config.current = None
    save(config)
    click.echo(f"context {name} deleted")


@context.command("path")
@json_option
def context_path(as_json: bool) -> None:
    """Where the config file is (OPSGATE_USER_CONFIG overrides it)."""
    if as_json:
        echo_json({"file": str(config_path())})
    else:
        click.echo(str(config_path()))
