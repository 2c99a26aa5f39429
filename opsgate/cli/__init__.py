"""The `opsgate` command: one click group, commands split across modules."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import click

from opsgate import __version__
from opsgate.cli import actions, admin, demo, doctor, execution, mcp, metrics, policy, report
from opsgate.cli import auth as auth_cli
from opsgate.cli import server as server_cli
from opsgate.cli.context import CliConfig
from opsgate.config import Settings
from opsgate.errors import OpsgateError
from opsgate.store.base import StoreError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="opsgate")
@click.option("--db", envvar="OPSGATE_DB", help="Store URL (default sqlite:///opsgate.db).")
@click.option(
    "--catalog",
    envvar="OPSGATE_CATALOG",
    type=click.Path(path_type=Path),
    help="Action catalog directory (default catalog/).",
)
@click.option(
    "--policies",
    envvar="OPSGATE_POLICIES",
    type=click.Path(path_type=Path),
    help="Policy bundle directory (default policies/).",
)
@click.pass_context
def cli(ctx: click.Context, db: str | None, catalog: Path | None, policies: Path | None) -> None:
    """opsgate: policy-guarded actions for production operations."""
    settings = Settings.load()
    overrides = {
        k: v
        for k, v in {"db": db, "catalog": catalog, "policies": policies}.items()
        if v is not None
    }
    config = CliConfig(settings.with_overrides(overrides))
    ctx.obj = config
    ctx.call_on_close(config.close)


cli.add_command(admin.init)
cli.add_command(admin.catalog)
cli.add_command(admin.audit)
cli.add_command(actions.propose)
cli.add_command(actions.queue)
cli.add_command(actions.show)
cli.add_command(actions.approve)
cli.add_command(actions.reject)
cli.add_command(actions.cancel)
cli.add_command(execution.run)
cli.add_command(execution.worker)
cli.add_command(execution.rollback)
cli.add_command(execution.workers)
cli.add_command(policy.policy)
cli.add_command(report.report)
cli.add_command(metrics.metrics)
cli.add_command(mcp.mcp)
cli.add_command(demo.demo)
cli.add_command(doctor.doctor)
cli.add_command(server_cli.server)
cli.add_command(server_cli.token)
cli.add_command(auth_cli.whoami)
cli.add_command(auth_cli.login)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and map every failure to one line on stderr and an exit code."""
    try:
        cli.main(args=argv, prog_name="opsgate", standalone_mode=False)
    except OpsgateError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    except StoreError as exc:
        click.echo(
            f"error: store: {exc} (is OPSGATE_DB right, and did you run `opsgate init`?)", err=True
        )
        return 1
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # the last line of defence: one line, not a traceback
        if os.environ.get("OPSGATE_DEBUG"):
            traceback.print_exc()
        click.echo(
            f"error: unexpected {type(exc).__name__}: {exc} (set OPSGATE_DEBUG=1 for "
            "the traceback)",
            err=True,
        )
        return 1
    return 0
