"""Report renderers: a rich table for the terminal, JSON and CSV for tools, Markdown for
tickets, and one self-contained HTML file with plotly charts (plotly.js is inlined, so
nothing is fetched when the file is viewed)."""

from __future__ import annotations

import csv
import html
import io
import json
from datetime import UTC, datetime
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from opsgate.reports.build import Report
from opsgate.safe_text import csv_cell, shown

FORMATS = ("table", "json", "csv", "markdown", "html")


def _ts(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _scope(report: Report) -> str:
    where = ", ".join(f"{k}={v}" for k, v in sorted(report.where.items()))
    text = f"{_ts(report.window.since)} .. {_ts(report.window.until)}"
    text += f" (compared with {_ts(report.previous.since)} .. {_ts(report.previous.until)})"
    return text + (f"; only {where}" if where else "")


def to_json(report: Report) -> str:
    document = {
        "kind": report.kind,
        "title": report.title,
        "window": {"since": _ts(report.window.since), "until": _ts(report.window.until)},
        "previous": {"since": _ts(report.previous.since), "until": _ts(report.previous.until)},
        "by": report.by,
        "where": dict(report.where),
        "headline": report.headline,
        "tables": [
            {
                "name": t.name,
                "title": t.title,
                "columns": t.columns,
                "keys": t.keys,
                "rows": t.records(),
                "note": t.note,
                "kinds": t.kinds,
            }
            for t in report.tables
        ],
        "charts": report.charts,
    }
    return json.dumps(document, indent=2, default=str)


def table_names(report: Report) -> list[str]:
    return [t.name for t in report.tables]


def to_csv(report: Report, table: str | None = None) -> str:
    """One CSV with one header row. With `table`, that table's columns; otherwise every
    table's rows under the union of their keys, the first column naming the table.
    Numbers are raw (rates as fractions, durations in seconds); empty means no value."""
    tables = report.tables
    if table is not None:
        tables = [t for t in report.tables if t.name == table]
    keys: list[str] = [] if table is not None else ["table"]
    for t in tables:
        keys += [k for k in t.keys if k not in keys]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n", restval="")
    writer.writerow({k: csv_cell(k) for k in keys})  # a header is a cell like any other
    for t in tables:
        for record in t.records():
            row = {k: _csv_cell(v) for k, v in record.items()}
            if table is None:
                row["table"] = t.name
            writer.writerow(row)
    return out.getvalue()


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return csv_cell(value)  # a text cell never starts a spreadsheet formula


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(report: Report) -> str:
    lines = [f"## {report.title}", "", f"_{_scope(report)}_", ""]
    lines += [f"- {sentence}" for sentence in report.headline]
    for table in report.tables:
        lines += ["", f"### {table.title}", ""]
        lines.append("| " + " | ".join(_md_cell(c) for c in table.columns) + " |")
        lines.append("|" + "---|" * len(table.columns))
        for row in table.formatted():
            lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
        if not table.rows:
            lines.append("| " + " | ".join("-" for _ in table.columns) + " |")
        if table.note:
            lines += ["", f"_{table.note}_"]
    return "\n".join(lines) + "\n"


def print_table(report: Report, console: Console | None = None) -> None:
    if console is None:
        console = Console(highlight=False)
        if not console.is_terminal:  # piped: do not squeeze the tables into 80 columns
            console = Console(highlight=False, width=200)
    console.print(f"[bold]{escape(shown(report.title))}[/]  {escape(shown(_scope(report)))}")
    for sentence in report.headline:
        console.print(f"  {escape(shown(sentence))}")
    for table in report.tables:
        rich_table = RichTable(title=f"\n{table.title}", title_justify="left")
        for column in table.columns:
            rich_table.add_column(column, overflow="fold")
        for row in table.formatted():
            rich_table.add_row(*(escape(shown(v)) for v in row))
        console.print(rich_table)
        if table.note:
            console.print(f"[dim]{escape(shown(table.note))}[/]")


# --- HTML -----------------------------------------------------------------------------------


def _charts(report: Report) -> list[tuple[str, go.Figure]]:
    charts: list[tuple[str, go.Figure]] = []
    layout = {"height": 320, "margin": {"l": 50, "r": 20, "t": 40, "b": 50}}
    days = report.charts.get("pass_rate_by_day")
    if days is not None:
        figure = go.Figure(
            go.Scatter(
                x=[d for d, _, _ in days],
                y=[(s / f) * 100 if f else None for _, f, s in days],
                mode="lines+markers",
                text=[f"{s} of {f}" for _, f, s in days],
                name="pass rate",
            )
        )
        figure.update_layout(title="Verification pass rate by day (%)", **layout)
        figure.update_yaxes(range=[0, 100])
        # Days as categories: one day of data must not become a zoomed-in time axis.
        figure.update_xaxes(type="category")
        charts.append(("pass_rate", figure))
    durations = report.charts.get("rollback_durations")
    if durations is not None:
        figure = go.Figure(go.Histogram(x=durations, nbinsx=30, name="rollbacks"))
        figure.update_layout(title="Rollback time distribution (seconds)", **layout)
        charts.append(("rollback_time", figure))
    for key, name, title in (
        ("blocks_by_code", "blocks", "Policy blocks at proposal by deny code"),
        ("stop_conditions", "stops", "Stop-condition activations by name"),
    ):
        counts = report.charts.get(key)
        if counts is None:
            continue
        ordered = sorted(counts.items(), key=lambda kv: -kv[1])
        figure = go.Figure(go.Bar(x=[k for k, _ in ordered], y=[v for _, v in ordered], name=name))
        figure.update_layout(title=title, **layout)
        charts.append((name, figure))
    return charts


def to_html(report: Report) -> str:
    """One file, no network at view time: plotly.js is inlined once."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(report.title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "th{background:#f3f3f3}.note{color:#666;font-size:12px}"
        ".charts{display:grid;grid-template-columns:1fr 1fr;gap:1em}</style>",
        f"<script>{get_plotlyjs()}</script>",
        "</head><body>",
        f"<h1>{html.escape(report.title)}</h1>",
        f"<p class='note'>{html.escape(_scope(report))}</p>",
        "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in report.headline) + "</ul>",
        "<div class='charts'>",
    ]
    for name, figure in _charts(report):
        div = figure.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"chart-{name}",
            config={"displayModeBar": False, "responsive": True},
        )
        parts.append(f"<div class='chart' data-chart='{name}'>{div}</div>")
    parts.append("</div>")
    for table in report.tables:
        parts.append(f"<h2>{html.escape(table.title)}</h2><table><tr>")
        parts += [f"<th>{html.escape(str(c))}</th>" for c in table.columns]
        parts.append("</tr>")
        for row in table.formatted():
            parts.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>")
        if not table.rows:
            parts.append(f"<tr><td colspan='{len(table.columns)}'>none</td></tr>")
        parts.append("</table>")
        if table.note:
            parts.append(f"<p class='note'>{html.escape(table.note)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render(report: Report, fmt: str, table: str | None = None) -> str:
    if fmt == "json":
        return to_json(report)
    if fmt == "csv":
        return to_csv(report, table)
    if fmt == "markdown":
        return to_markdown(report)
    if fmt == "html":
        return to_html(report)
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
