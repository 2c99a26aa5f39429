"""policy eval (dry run) and policy test (the bundle's Rego unit tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from opsgate.cli.actions import build_document, proposal_options
from opsgate.cli.context import CliConfig, echo_json, json_option, pass_config
from opsgate.cli.render import decision_json, deny_lines
from opsgate.errors import OpsgateError


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
