"""watch: follow an action a worker runs, from the store, until it ends; and how `run`
hands an action over on Ctrl-C and resumes it afterwards."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from opsgate.cli.context import CliConfig, finite_seconds, json_option, pass_config
from opsgate.cli.ids import ACTION_ID
from opsgate.errors import OpsgateError, StateConflict
from opsgate.executor.executor import Executor
from opsgate.ids import log_id
from opsgate.models import Action, ActionState, AuditEvent, Execution, Measurement
from opsgate.verification.evaluator import (
    VerificationState,
    halt_range_text,
    pass_range_text,
)

S = ActionState
# Under way: a worker (or an interrupted `run`) has claimed it and not finished.
UNDER_WAY = frozenset({S.EXECUTING, S.VERIFYING, S.ROLLING_BACK})
_STYLE = {"pass": "green", "fail": "red", "error": "magenta", "inconclusive": "yellow"}


class Interrupted(OpsgateError):
    """Ctrl-C: the action was handed over, not finished (128 + SIGINT, as shells do)."""

    exit_code = 130


def resumable(config: CliConfig, action: Action | None) -> bool:
    """Whether `run` should resume this action rather than claim it: it is under way and
    no live worker holds its lease (released by an interrupted run, or lapsed)."""
    if action is None or action.state not in UNDER_WAY:
        return False
    execution = config.store.get_execution(action.id)
    if execution is None or execution.finished_at is not None:
        return False
    if execution.lease_expires_at > datetime.now(UTC):
        raise StateConflict(
            f"action {action.id} is {action.state.value} and worker {execution.worker_id} "
            f"holds it; follow it with `opsgate watch {action.id}`"
        )
    return True


def resume_here(executor: Executor, action_id: str) -> None:
    click.echo(f"resuming {action_id} here, where it was left", err=True)
    if not executor.resume(action_id):
        raise StateConflict(
            f"action {action_id} was taken over by another worker meanwhile; follow it with "
            f"`opsgate watch {action_id}`"
        )


def refuse_if_handed_over(config: CliConfig, action_id: str) -> None:
    """After `run`: an action still under way was handed over by an interrupt."""
    action = config.store.get_action(action_id)
    if action is not None and action.state in UNDER_WAY:
        raise Interrupted(
            f"interrupted: action {action_id} is {action.state.value} and no longer held "
            f"here; a running `opsgate worker` resumes it, or resume it here with "
            f"`opsgate run {action_id}`; follow it with `opsgate watch {action_id}`"
        )


def _clock(at: datetime | None = None) -> str:
    return (at or datetime.now(UTC)).astimezone(UTC).strftime("%H:%M:%S")


class Follower:
    """What changed in the store since the last look: state, measurements, events."""

    def __init__(self, config: CliConfig, action_id: str) -> None:
        self.config = config
        self.action_id = action_id
        self.state: ActionState | None = None
        self.seen_measurements = 0
        self.last_seq = 0
        self.latest: dict[str, Measurement] = {}
        self.execution: Execution | None = None

    def poll(self) -> tuple[Action, list[Measurement], list[AuditEvent]]:
        store = self.config.store
        action = store.get_action(self.action_id)
        if action is None:  # resolved a moment ago: only a deleted store gets here
            raise StateConflict(f"action {self.action_id} disappeared from the store")
        if action.state not in (S.PENDING_APPROVAL, S.APPROVED):
            self.execution = store.get_execution(self.action_id)
        measurements = store.measurements_for(self.action_id)
        fresh = measurements[self.seen_measurements :]
        self.seen_measurements = len(measurements)
        for m in fresh:
            self.latest[m.name] = m
        events = [e for e in store.audit_events(action_id=self.action_id) if e.seq > self.last_seq]
        if events:
            self.last_seq = events[-1].seq
        return action, fresh, events


def _outcome(m: Measurement) -> str:
    # A measurement whose window predates the change is stored but does not count.
    return f"{m.outcome} ({m.not_counted.replace('_', '-')})" if m.not_counted else m.outcome


def _baseline(f: Follower, action: Action) -> dict[str, float]:
    """The baseline relative ranges are judged against, as the worker stored it."""
    execution = f.execution
    if execution is None:
        return {}
    stored = (
        execution.rollback_verify_state
        if action.state is S.ROLLING_BACK
        else execution.verify_state
    )
    try:
        return dict(VerificationState.model_validate(dict(stored or {})).baseline)
    except ValueError:
        return {}


def _event_line(event: AuditEvent) -> str:
    transition = f" -> {event.to_state}" if event.to_state else ""
    why = event.data.get("why") or event.data.get("reason") or ""
    return f"{event.kind}{transition} by {event.actor}" + (f" ({why})" if why else "")


class PlainWatch:
    """Lines, as `run` prints when not on a terminal."""

    def __enter__(self) -> PlainWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(
        self, action: Action, fresh: list[Measurement], events: list[AuditEvent], f: Follower
    ) -> None:
        for event in events:
            click.echo(f"{_clock(event.at)} {_event_line(event)}")
        for m in fresh:
            value = "-" if m.value is None else f"{m.value:.6g}"
            click.echo(f"{_clock(m.at)} {m.phase} {m.name}={value} {_outcome(m)}")


class LiveWatch:
    """The live panel `run` shows: each signal and stop condition against its range."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.messages: list[str] = []
        self._live = Live(Text(title), refresh_per_second=4, transient=False)

    def __enter__(self) -> LiveWatch:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.__exit__(*exc)

    def update(
        self, action: Action, fresh: list[Measurement], events: list[AuditEvent], f: Follower
    ) -> None:
        self.messages = [
            *self.messages,
            *(f"{_clock(e.at)} {_event_line(e)}" for e in events),
        ][-6:]
        header = Text.from_markup(
            f"[bold]{escape(self.title)}[/]  state: [bold]{action.state.value}[/]"
        )
        table = Table(box=None, pad_edge=False)
        for column in ("", "name", "latest", "range", "outcome"):
            table.add_column(column)
        spec = action.verification
        base = _baseline(f, action)
        rows = [("signal", s.name, pass_range_text(s, base.get(s.name))) for s in spec.signals]
        rows += [
            ("stop", c.name, "halt " + halt_range_text(c, base.get(c.name)))
            for c in spec.stop_conditions
        ]
        for kind, name, shown_range in rows:
            record = f.latest.get(name)
            value = "-" if record is None or record.value is None else f"{record.value:.4g}"
            outcome = _outcome(record) if record else "waiting"
            style = _STYLE.get(record.outcome if record else "", "dim")
            if record is not None and record.not_counted:
                style = "dim"
            table.add_row(kind, escape(name), value, shown_range, f"[{style}]{outcome}[/]")
        parts: list[Any] = [header, table, *(Text(m) for m in self.messages)]
        self._live.update(Group(*parts))


@click.command()
@click.argument("action_id", type=ACTION_ID)
@click.option(
    "--interval",
    type=click.FloatRange(0.1, 60),
    default=1.0,
    show_default=True,
    callback=finite_seconds,
    help="Seconds between looks at the store.",
)
@json_option
@pass_config
def watch(config: CliConfig, action_id: str, interval: float, as_json: bool) -> None:
    """Follow an action that a worker runs, live, until it ends; exit as `run` would.

    Exit 0 when verified, 3 when blocked at execution, 1 for any other end; Ctrl-C
    stops watching (exit 130), never the action.
    """
    from opsgate.cli.execution import finish

    follower = Follower(config, action_id)
    action = config.store.get_action(action_id)
    assert action is not None  # ACTION_ID resolved it
    title = f"{log_id(action_id)}  {action.action_type} {action.target} ({action.environment})"
    view: PlainWatch | LiveWatch
    view = LiveWatch(title) if sys.stdout.isatty() and not as_json else PlainWatch()
    quiet = as_json
    try:
        with view:
            while True:
                action, fresh, events = follower.poll()
                if not quiet:
                    view.update(action, fresh, events, follower)
                if action.state.terminal:
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        raise Interrupted(
            f"stopped watching; action {action_id} goes on ({action.state.value})"
        ) from None
    finish(config, action_id, as_json)
