"""policy eval (dry run) and policy test (the bundle's Rego unit tests)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from opsgate.cli.actions import build_document, proposal_options
from opsgate.cli.context import CliConfig, echo_json, json_format, json_option, pass_config
from opsgate.cli.render import decision_json, deny_lines
from opsgate.errors import InvalidInput, OpsgateError
from opsgate.safe_text import shown, shown_block

if TYPE_CHECKING:
    from opsgate.models import Decision


@click.group()
def policy() -> None:
    """The Rego policy bundle."""


@policy.command("eval")
@proposal_options
@json_option
@pass_config
def policy_eval(config: CliConfig, as_json: bool, **fields: Any) -> None:
    """Dry run: the decision for a proposal; nothing is stored."""
    document = build_document(**fields)
    _, decision = config.gate.dry_run(document, config.identity())
    if as_json:
        echo_json(decision_json(decision))
    elif decision.allow:
        click.echo(
            f"allow: needs {decision.required_approvals} approval(s) from "
            f"{'|'.join(decision.approver_roles) or 'any role'} "
            f"(bundle {decision.bundle_revision[:19]})"
        )
    else:
        click.echo(f"deny (bundle {decision.bundle_revision[:19]}):")
        for line in deny_lines(decision):
            click.echo(line)
    if not decision.allow:
        raise SystemExit(3)


class RegoTestsFailed(OpsgateError):
    exit_code = 3


MAX_INPUTS = 100_000


@policy.command("test")
@click.option(
    "--policies",
    "directory",
    type=click.Path(path_type=Path),
    default=None,
    help="Bundle directory (default: OPSGATE_POLICIES).",
)
@click.option(
    "--against-opa",
    is_flag=True,
    help="Also decide generated inputs with regopy and with OPA's Go evaluator; "
    "any disagreement fails.",
)
@click.option(
    "--count",
    type=click.IntRange(1, MAX_INPUTS),
    default=500,
    show_default=True,
    help="Inputs to generate for --against-opa.",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**63 - 1),
    default=0,
    show_default=True,
    help="Seed of the generated inputs (the same seed, the same inputs).",
)
@json_option
@pass_config
def policy_test(
    config: CliConfig,
    directory: Path | None,
    against_opa: bool,
    count: int,
    seed: int,
    as_json: bool,
) -> None:
    """Run the bundle's Rego unit tests (test_* rules)."""
    from opsgate.policies.rego_tests import run_rego_tests

    bundle = directory or config.settings.policies
    if not bundle.is_dir():
        raise InvalidInput("--policies", f"{bundle} is not a directory (set OPSGATE_POLICIES)")
    results = run_rego_tests(bundle)
    failed = [r for r in results if not r.passed]
    refused = any(r.name == "(bundle)" for r in failed)
    differential: dict[str, Any] | None = None
    if against_opa and not refused:
        differential = _against_opa(config, bundle, count, seed)
    if as_json:
        rows = [r.__dict__ for r in results]
        echo_json(rows if differential is None else {"tests": rows, "against_opa": differential})
    else:
        for r in results:
            mark = "PASS" if r.passed else "FAIL"
            extra = f" ({r.error})" if r.error else ""
            name = f"{r.package}.{r.name}" if r.package else r.name
            click.echo(f"{mark} {name}{extra}")
        click.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
        if differential is not None:
            _print_differential(differential)
        elif against_opa:
            click.echo("against OPA: skipped, the bundle does not load in the embedded engine")
    if not results:
        raise RegoTestsFailed(f"no test_* rules found in {bundle}")
    if refused:
        problems = [r for r in failed if r.name == "(bundle)"]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RegoTestsFailed(f"{bundle}: {problems[0].error}{more}")
    if failed:
        raise RegoTestsFailed(f"{len(failed)} Rego test(s) failed")
    if differential is not None and differential["disagreements"]:
        raise RegoTestsFailed(
            f"regopy and OPA disagree on {differential['disagreements']} of "
            f"{differential['inputs']} generated inputs (seed {seed})"
        )


# Shrinking costs evaluations: only the first few disagreements are shrunk and shown.
SHOWN_DISAGREEMENTS = 3


def _against_opa(config: CliConfig, bundle: Path, count: int, seed: int) -> dict[str, Any]:
    """Generated inputs through both engines (each sandboxed, under the deadline)."""
    from opsgate.policies.differential import Space, compare, random_inputs, shrink
    from opsgate.policies.embedded import EmbeddedEngine, OpaEmbeddedEngine
    from opsgate.policies.engine import load_bundle_data

    try:
        import opa_bindings  # noqa: F401
    except ImportError:
        raise OpsgateError(
            "--against-opa needs OPA's Go evaluator: pip install --ignore-requires-python "
            "opa-golib-python-bindings"
        ) from None
    try:
        catalog = sorted(config.catalog.types)
    except OpsgateError:
        catalog = []  # a bundle tested on its own: the names in its data suffice
    try:
        space = Space.from_data(load_bundle_data(bundle), catalog)
    except (OSError, ValueError) as exc:
        raise InvalidInput("--policies", f"cannot read the bundle's data: {exc}") from None
    timeout = config.settings.policy_timeout
    with (
        EmbeddedEngine(bundle, timeout=timeout) as embedded,
        OpaEmbeddedEngine(bundle, timeout=timeout) as opa,
    ):
        found = [
            d
            for rule, document in random_inputs(space, count, seed)
            if (d := compare(embedded, opa, rule, document)) is not None
        ]
        shown = [shrink(embedded, opa, d) for d in found[:SHOWN_DISAGREEMENTS]]
    return {
        "inputs": count,
        "seed": seed,
        "disagreements": len(found),
        "minimal": [
            {
                "rule": d.rule,
                "fields": d.fields(),
                "input": d.input,
                "embedded": d.embedded,
                "opa": d.opa,
            }
            for d in shown
        ],
    }


def _print_differential(result: dict[str, Any]) -> None:
    if not result["disagreements"]:
        click.echo(
            f"against OPA: {result['inputs']} generated inputs (seed {result['seed']}), "
            "every decision identical"
        )
        return
    click.echo(
        f"against OPA: {result['disagreements']} of {result['inputs']} generated inputs "
        f"(seed {result['seed']}) decided differently; minimal inputs:"
    )
    for item in result["minimal"]:
        click.echo(f"  {item['rule']} differs in {', '.join(item['fields'])}:")
        click.echo(f"    input:  {json.dumps(item['input'], sort_keys=True)}")
        click.echo(f"    regopy: {json.dumps(item['embedded'], sort_keys=True)}")
        click.echo(f"    OPA:    {json.dumps(item['opa'], sort_keys=True)}")


def _track_record_then(config: CliConfig) -> Callable[[Decision], dict[str, Any] | None]:
    """For a decision stored before inputs carried a track record: its input with the
    proposer's record as of the decision (None if it cannot be read)."""
    from opsgate.trust import attach

    def fill(decision: Decision) -> dict[str, Any] | None:
        document = dict(decision.input)
        if not isinstance(document.get("proposer"), dict):
            return None
        document["proposer"] = dict(document["proposer"])
        error = attach(
            document,
            config.store,
            now=decision.decided_at,
            window_seconds=config.settings.track_record_window,
            as_of=True,
        )
        return None if error is not None else document

    return fill


@policy.command("replay")
@click.option(
    "--policies",
    "directory",
    type=click.Path(path_type=Path),
    required=True,
    help="The candidate bundle directory.",
)
@click.option("--since", default="90d", show_default=True, help="A duration back, or a date.")
@click.option("--until", default=None, help="A duration back, or a date (default now).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "markdown"]),
    help="table (default), json or markdown.",
)
@json_option
@pass_config
def policy_replay(
    config: CliConfig,
    directory: Path,
    since: str,
    until: str | None,
    fmt: str | None,
    as_json: bool,
) -> None:
    """What a candidate bundle would have decided for past proposals (read-only)."""
    fmt = json_format(fmt, as_json, default="table")
    from datetime import UTC, datetime

    from opsgate.policies.embedded import EmbeddedEngine
    from opsgate.policies.replay import replay, to_markdown
    from opsgate.reports.request import parse_moment

    if not directory.is_dir():
        raise InvalidInput("--policies", f"{directory} is not a directory")
    now = datetime.now(UTC)
    start = parse_moment(since, "--since", now)
    end = parse_moment(until, "--until", now) if until else now
    if start >= end:
        raise InvalidInput("--since", "must be before --until")
    candidate = EmbeddedEngine(directory)
    result = replay(
        config.store.decisions_between(start, end, ["propose"]),
        candidate,
        fill=_track_record_then(config),
    )
    if fmt == "json":
        echo_json(result.as_json())
        return
    if fmt == "markdown":
        text = to_markdown(result, start.isoformat(), end.isoformat())
        click.echo(shown_block(text), nl=False)
        return
    click.echo(
        f"{result.replayed} proposals replayed under {result.revision_after[:19]} "
        f"({result.skipped} skipped); nothing was written"
    )
    click.echo(
        f"newly blocked {len(result.newly_blocked)}, newly allowed "
        f"{len(result.newly_allowed)}, approvals changed {len(result.approvals_changed)}, "
        f"codes changed {len(result.codes_changed)}, unchanged {result.unchanged}"
    )
    codes = sorted(set(result.codes_before) | set(result.codes_after))
    for code in codes:
        before, after = result.codes_before[code], result.codes_after[code]
        click.echo(f"  {shown(code)}: {before} -> {after} ({after - before:+d})")
    for proposer, tally in sorted(result.per_proposer.items()):
        click.echo(
            f"  {shown(proposer)}: {tally['decisions']} decisions, approvals "
            f"+{tally['approvals_added']} / -{tally['approvals_saved']}, newly blocked "
            f"{tally['newly_blocked']}, newly allowed {tally['newly_allowed']}"
        )
    for row in result.newly_blocked:
        codes_text = shown(", ".join(row["codes"]))
        click.echo(f"  newly blocked {row['action_id']} {row['action']}: {codes_text}")
    for row in result.newly_allowed:
        click.echo(f"  newly allowed {row['action_id']} {row['action']}")
