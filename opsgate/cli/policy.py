"""policy eval (dry run) and policy test (the bundle's Rego unit tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from opsgate.cli.actions import build_document, proposal_options
from opsgate.cli.context import CliConfig, echo_json, json_format, json_option, pass_config
from opsgate.cli.render import decision_json, deny_lines
from opsgate.errors import InvalidInput, OpsgateError


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


@policy.command("test")
@click.option(
    "--policies",
    "directory",
    type=click.Path(path_type=Path),
    default=None,
    help="Bundle directory (default: OPSGATE_POLICIES).",
)
@json_option
@pass_config
def policy_test(config: CliConfig, directory: Path | None, as_json: bool) -> None:
    """Run the bundle's Rego unit tests (test_* rules)."""
    from opsgate.policies.rego_tests import run_rego_tests

    bundle = directory or config.settings.policies
    if not bundle.is_dir():
        raise OpsgateError(f"{bundle} is not a directory (set OPSGATE_POLICIES)")
    results = run_rego_tests(bundle)
    failed = [r for r in results if not r.passed]
    if as_json:
        echo_json([r.__dict__ for r in results])
    else:
        for r in results:
            mark = "PASS" if r.passed else "FAIL"
            extra = f" ({r.error})" if r.error else ""
            click.echo(f"{mark} {r.package}.{r.name}{extra}")
        click.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if not results:
        raise RegoTestsFailed(f"no test_* rules found in {bundle}")
    if failed:
        raise RegoTestsFailed(f"{len(failed)} Rego test(s) failed")


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

    from opsgate.cli.report import parse_moment
    from opsgate.policies.embedded import EmbeddedEngine
    from opsgate.policies.replay import replay, to_markdown

    if not directory.is_dir():
        raise InvalidInput("--policies", f"{directory} is not a directory")
    now = datetime.now(UTC)
    start = parse_moment(since, "--since", now)
    end = parse_moment(until, "--until", now) if until else now
    if start >= end:
        raise InvalidInput("--since", "must be before --until")
    candidate = EmbeddedEngine(directory)
    result = replay(config.store.decisions_between(start, end, ["propose"]), candidate)
    if fmt == "json":
        echo_json(result.as_json())
        return
    if fmt == "markdown":
        click.echo(to_markdown(result, start.isoformat(), end.isoformat()), nl=False)
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
        click.echo(f"  {code}: {before} -> {after} ({after - before:+d})")
    for row in result.newly_blocked:
        click.echo(f"  newly blocked {row['action_id']} {row['action']}: {', '.join(row['codes'])}")
    for row in result.newly_allowed:
        click.echo(f"  newly allowed {row['action_id']} {row['action']}")
