"""completion: shell completion scripts, and the dynamic completions they ask for (action
types, environments, action ids), read from the configured catalog, bundle and store."""

from __future__ import annotations

from typing import Any

import click
from click.shell_completion import CompletionItem, get_completion_class

SHELLS = ("bash", "zsh", "fish")
COMPLETE_VAR = "_OPSGATE_COMPLETE"
MAX_IDS = 50


def _settings(ctx: click.Context) -> Any:
    """The settings the command being completed would use (flags typed so far included)."""
    from opsgate.config import Settings

    root = ctx.find_root()
    params = root.params
    settings = Settings.load(context=params.get("context_name"))
    overrides = {k: params[k] for k in ("db", "catalog", "policies") if params.get(k) is not None}
    return settings.with_overrides(overrides)


def _quietly(func: Any) -> Any:
    """A completion must never print a traceback into the user's shell: no match instead."""

    def wrapper(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
        try:
            return list(func(ctx, param, incomplete))
        except Exception:  # anything at all: offer nothing rather than break the prompt
            return []

    return wrapper


@_quietly
def action_types(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    from opsgate.catalog import load_catalog

    catalog = load_catalog(_settings(ctx).catalog)
    return [
        CompletionItem(t.name, help=t.description) for t in catalog if t.name.startswith(incomplete)
    ]


@_quietly
def environments(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    from opsgate.policies.engine import bundle_environments

    known = bundle_environments(_settings(ctx).policies) or frozenset()
    return [CompletionItem(e) for e in sorted(known) if e.startswith(incomplete)]


@_quietly
def action_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """The newest actions' ids (a read: it opens the store, creates nothing)."""
    from opsgate.store import open_store
    from opsgate.store.base import ActionQuery

    store = open_store(_settings(ctx).db)
    try:
        found = store.find_actions(ActionQuery(limit=MAX_IDS * 4))
    finally:
        store.close()
    prefix = incomplete.upper()
    return [
        CompletionItem(a.id, help=f"{a.action_type} {a.target} ({a.environment}) {a.state.value}")
        for a in found
        if a.id.startswith(prefix)
    ][:MAX_IDS]


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the completion script for SHELL (commands, options, action types,
    environments and action ids).

    \b
    bash:  eval "$(opsgate completion bash)"      (in ~/.bashrc)
    zsh:   eval "$(opsgate completion zsh)"       (in ~/.zshrc)
    fish:  opsgate completion fish > ~/.config/fish/completions/opsgate.fish
    """
    from opsgate.cli import cli

    cls = get_completion_class(shell)
    assert cls is not None  # every name in SHELLS is one click knows
    click.echo(cls(cli, {}, "opsgate", COMPLETE_VAR).source())
