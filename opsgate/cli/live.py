"""What `opsgate run`, `worker` and `rollback` print while actions run: a rich live
table of each signal against its range with the hold countdown on a terminal, plain
lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
import threading
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from opsgate.cli.render import evidence_note, shown
from opsgate.executor.executor import ExecutorEvent
from opsgate.ids import log_id
from opsgate.verification.evaluator import halt_range_text, pass_range_text, remaining_hold
from opsgate.verification.hub import Watch

_STYLE = {"pass": "green", "fail": "red", "error": "magenta", "inconclusive": "yellow"}


def _clock() -> str:
    return datetime.now(UTC).strftime("%H:%M:%S")


def _outcome_label(outcome: str, not_counted: str | None) -> str:
    return f"{outcome} ({not_counted.replace('_', '-')})" if not_counted else outcome


class PlainView:
    """One line per event and per measurement: greppable, no cursor tricks."""

    def __init__(self, prefix_ids: bool = False) -> None:
        self.prefix_ids = prefix_ids
        self._lock = threading.Lock()

    def __enter__(self) -> PlainView:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __call__(self, event: ExecutorEvent) -> None:
        lines: list[str] = []
        prefix = f"{_clock()} {log_id(event.action_id)} " if self.prefix_ids else f"{_clock()} "
        if event.kind == "measured" and event.watch is not None:
            watch = event.watch
            for record in watch.last_records:
                lines.append(
                    f"{prefix}{watch.phase} {record.name}="
                    f"{'-' if record.value is None else f'{record.value:.6g}'} "
                    f"{_outcome_label(record.outcome, record.not_counted)}"
                )
            if watch.phase != "run" and not watch.state.done:
                now = datetime.now(UTC)
                note = evidence_note(watch.state, now)
                if note is not None:
                    lines.append(f"{prefix}{watch.phase} {note}")
                else:
                    left = remaining_hold(watch.spec, watch.state, now)
                    lines.append(f"{prefix}{watch.phase} hold {left:.0f}s to go")
        elif event.kind != "finished" or self.prefix_ids:
            lines.append(f"{prefix}{event.kind}: {event.message}")
        with self._lock:
            for line in lines:
                click.echo(shown(line))


class LiveView:
    """A rich live panel for one action: state, steps, each signal, the hold left."""

    def __init__(self, action_id: str, title: str) -> None:
        self.action_id = action_id
        self.title = title
        self.state = "executing"
        self.messages: list[str] = []
        self.watch: Watch | None = None
        self._live = Live(self._render(), refresh_per_second=4, transient=False)

    def __enter__(self) -> LiveView:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.update(self._render())
        self._live.__exit__(*exc)

    def __call__(self, event: ExecutorEvent) -> None:
        if event.action_id != self.action_id:
            return
        if event.watch is not None:
            self.watch = event.watch
        if event.state is not None:
            self.state = event.state.value
        if event.kind not in ("measured", "finished") and event.message:
            self.messages = [*self.messages, f"{_clock()} {event.message}"][-6:]
        self._live.update(self._render())

    def _render(self) -> Group:
        header = Text.from_markup(
            f"[bold]{escape(shown(self.title))}[/]  state: [bold]{self.state}[/]"
        )
        parts: list[Any] = [header]
        watch = self.watch
        if watch is not None:
            table = Table(box=None, pad_edge=False)
            for column in ("", "name", "latest", "range", "outcome"):
                table.add_column(column)
            latest = {r.name: r for r in watch.last_records}
            base = watch.state.baseline
            rows = [
                ("signal", s.name, pass_range_text(s, base.get(s.name))) for s in watch.spec.signals
            ]
            rows += [
                ("stop", c.name, "halt " + halt_range_text(c, base.get(c.name)))
                for c in watch.spec.stop_conditions
            ]
            for kind, name, shown_range in rows:
                record = latest.get(name)
                value = "-" if record is None or record.value is None else f"{record.value:.4g}"
                outcome = record.outcome if record else "waiting"
                style = _STYLE.get(outcome, "dim")
                if record is not None and record.not_counted:
                    style = "dim"
                label = _outcome_label(outcome, record.not_counted if record else None)
                table.add_row(kind, escape(shown(name)), value, shown_range, f"[{style}]{label}[/]")
            parts.append(table)
            if watch.phase != "run":
                now = datetime.now(UTC)
                left = remaining_hold(watch.spec, watch.state, now)
                elapsed = (now - watch.state.started_at).total_seconds()
                note = evidence_note(watch.state, now)
                line = (
                    f"{watch.phase}: "
                    + (f"{note} · " if note and not watch.state.done else "")
                    + f"hold {left:.0f}s to go of {watch.spec.hold:g}s · "
                    f"{elapsed:.0f}s of timeout {watch.spec.timeout:g}s"
                )
                if watch.phase == "verify":  # a rollback's verification counts no failures
                    line += f" · failures {watch.state.failures}/{watch.spec.failure_limit}"
                parts.append(Text(line))
        parts.extend(Text(shown(m)) for m in self.messages)
        return Group(*parts)


def view_for(action_id: str | None, title: str) -> Any:
    """A live panel on a terminal for one action; plain lines otherwise."""
    if action_id is not None and sys.stdout.isatty():
        return LiveView(action_id, title)
    return PlainView(prefix_ids=action_id is None)
