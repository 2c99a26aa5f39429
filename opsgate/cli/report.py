"""opsgate report: governance figures over a window, compared with the one before."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click

from opsgate.cli.context import CliConfig, json_format, json_option, pass_config
from opsgate.errors import ConfigError
from opsgate.reports.build import DEFAULT_MIN_RUNS
from opsgate.reports.queries import SEGMENTS
from opsgate.reports.render import FORMATS, print_table, render
from opsgate.reports.request import KINDS, ReportRequest, build_report
from opsgate.store.sql import SqlStore


@click.command()
@click.argument("kind", type=click.Choice(KINDS), default="summary", required=False)
@click.option(
    "--since", default=None, help="Start: a duration back from now (90d) or a date. Default 30d."
)
@click.option("--until", default=None, help="End: a duration back from now or a date. Default now.")
@click.option(
    "--by",
    type=click.Choice([*SEGMENTS, "code"]),
    help="Cut every figure by this segment (`code`: deny code, for blocks).",
)
@click.option(
    "--where",
    "where_pairs",
    multiple=True,
    metavar="SEGMENT=VALUE",
    help="Only this segment; repeatable.",
)
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="table (default), json, csv, ...")
@json_option
@click.option(
    "--min-runs",
    type=click.IntRange(1, 1_000_000),
    default=DEFAULT_MIN_RUNS,
    show_default=True,
    envvar="OPSGATE_REPORT_MIN_RUNS",
    help="A pass rate or rollback time over fewer runs says `too few to judge`.",
)
@click.option(
    "--table",
    "table_name",
    help="Only this table (for CSV: its own columns, no `table` column).",
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to a file."
)
@click.option(
    "--kind",
    "proposer_kind",
    type=click.Choice(["agent", "human"]),
    help="`proposers` only: just agents or just humans.",
)
@pass_config
def report(
    config: CliConfig,
    kind: str,
    since: str | None,
    until: str | None,
    by: str | None,
    where_pairs: tuple[str, ...],
    fmt: str | None,
    output: Path | None,
    table_name: str | None,
    min_runs: int,
    as_json: bool,
    proposer_kind: str | None,
) -> None:
    """Pass rates, rollback times, policy blocks and approvals, segment by segment.

    KIND is summary (default: one screen), verification, blocks, rollbacks, approvals or
    proposers (a scorecard per proposer, per action type with --by action).
    """
    fmt = json_format(fmt, as_json, default="table")
    request = ReportRequest(
        kind, since, until, by, where_pairs, min_runs, table_name, proposer_kind
    )
    if config.server_url is not None:  # client mode: the server builds and renders it
        wanted = "markdown" if fmt == "table" and output is not None else fmt
        text = config.remote.report(request, wanted)
    else:
        store = config.store
        if not isinstance(store, SqlStore):
            raise ConfigError("reports need a SQL store (sqlite:// or postgresql://)")
        # The scorecard's rungs ask the bundle, so only it builds the gate (and catalog).
        gate = config.gate if kind == "proposers" else None
        built = build_report(store, request, datetime.now(UTC), gate=gate)
        if fmt == "table" and output is None:
            print_table(built)
            return
        text = render(built, "markdown" if fmt == "table" else fmt, table_name)
    if output is None:
        click.echo(text, nl=not text.endswith("\n"))
        return
    output.write_text(text, encoding="utf-8")
    click.echo(f"wrote {output} ({len(text.encode()):,} bytes)", err=True)
