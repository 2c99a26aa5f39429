"""The `opsgate` command: one click group, commands split across modules."""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path

import click

from opsgate import __version__
from opsgate.cli.context import CliConfig, output_mode
from opsgate.config import Settings
from opsgate.errors import OpsgateError, Refused, did_you_mean
from opsgate.store.base import StoreError

# Each command's module is imported when that command runs, so `opsgate --version` or
# `opsgate queue` never pays for the executor, reports, plotly or the MCP server.
COMMANDS = {
    "init": "admin:init",
    "catalog": "admin:catalog",
    "audit": "admin:audit",
    "propose": "actions:propose",
    "queue": "actions:queue",
    "list": "listing:list_actions",
    "get": "listing:list_actions",
    "show": "actions:show",
    "approve": "actions:approve",
    "reject": "actions:reject",
    "cancel": "actions:cancel",
    "run": "execution:run",
    "watch": "watch:watch",
    "worker": "execution:worker",
    "rollback": "execution:rollback",
    "workers": "execution:workers",
    "policy": "policy:policy",
    "report": "report:report",
    "metrics": "metrics:metrics",
    "mcp": "mcp:mcp",
    "demo": "demo:demo",
    "doctor": "doctor:doctor",
    "context": "contexts:context",
    "completion": "completion:completion",
    "server": "server:server",
    "token": "server:token",
    "trust": "trust:trust",
    "whoami": "auth:whoami",
    "login": "auth:login",
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when the command is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, attr = target.split(":")
        command = getattr(importlib.import_module(f"opsgate.cli.{module}"), attr)
        assert isinstance(command, click.Command)
        return command

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = click.utils.make_str(args[0]) if args else ""
        unknown = args and not name.startswith("-") and self.get_command(ctx, name) is None
        if unknown and not ctx.resilient_parsing:  # completing: offer, never fail
            ctx.fail(f"no such command {name!r}{did_you_mean(name, self.list_commands(ctx))}")
        return super().resolve_command(ctx, args)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option(
    "--context",
    "context_name",
    metavar="NAME",
    help="A context of your config file (default: OPSGATE_CONTEXT, then current-context).",
)
@click.pass_context
def cli(
    ctx: click.Context,
    db: str | None,
    catalog: Path | None,
    policies: Path | None,
    context_name: str | None,
) -> None:
    """opsgate: policy-guarded actions for production operations."""
    # `opsgate context ...` must work on a config file it is about to fix.
    settings = Settings.load(
        context=context_name, use_contexts=ctx.invoked_subcommand not in ("context", "completion")
    )
    overrides = {
        k: v
        for k, v in {"db": db, "catalog": catalog, "policies": policies}.items()
        if v is not None
    }
    config = CliConfig(settings.with_overrides(overrides))
    ctx.obj = config
    ctx.call_on_close(config.close)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and map every failure to one line on stderr and an exit code (a JSON
    object on stderr under --json, with the same exit code)."""
    args = list(sys.argv[1:] if argv is None else argv)
    output_mode.json = False
    report = _ErrorReport(args)
    try:
        cli.main(args=args, prog_name="opsgate", standalone_mode=False)
    except OpsgateError as exc:
        field = getattr(exc, "field", None) or None
        extra = {"deny_codes": exc.codes} if isinstance(exc, Refused) else {}
        return report(exc, str(exc), exc.exit_code, field, extra)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        return report(None, "aborted", 1, code="aborted")
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        field = None
        if isinstance(exc, click.BadParameter) and exc.param is not None:
            opts = getattr(exc.param, "opts", None) or [exc.param.name or ""]
            field = max(opts, key=len)
        return report(None, f"{exc.format_message()}{hint}", 2, field, code="usage")
    except click.ClickException as exc:
        return report(None, exc.format_message(), exc.exit_code, code="usage")
    except StoreError as exc:
        return report(
            exc,
            f"store: {exc} (is OPSGATE_DB right, and did you run `opsgate init`?)",
            1,
            code="store_error",
        )
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # the last line of defence: one line, not a traceback
        if os.environ.get("OPSGATE_DEBUG"):
            traceback.print_exc()
        return report(
            exc,
            f"unexpected {type(exc).__name__}: {exc} (set OPSGATE_DEBUG=1 for the traceback)",
            1,
            code="unexpected",
        )
    return 0


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class _ErrorReport:
    """Prints an error as `error: ...` or, when --json was asked for, as one JSON object."""

    def __init__(self, args: list[str]) -> None:
        # Also for errors raised before click reached --json (a missing argument).
        before_separator = args[: args.index("--")] if "--" in args else args
        self._asked = "--json" in before_separator

    def __call__(
        self,
        exc: BaseException | None,
        message: str,
        exit_code: int,
        field: str | None = None,
        extra: Mapping[str, object] | None = None,
        *,
        code: str | None = None,
    ) -> int:
        if output_mode.json or self._asked:
            error: dict[str, object] = {
                "code": code or _snake(type(exc).__name__),
                "message": message,
                "field": field,
                "exit_code": exit_code,
                **(extra or {}),
            }
            click.echo(json.dumps({"error": error}, sort_keys=True), err=True)
        else:
            click.echo(f"error: {message}", err=True)
        return exit_code
