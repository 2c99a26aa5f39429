"""list (alias get): find actions by state, environment, type, target, proposer and age."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import click
from rich.markup import escape
from rich.table import Table

from opsgate.cli.completion import action_types as complete_action_types
from opsgate.cli.completion import environments as complete_environments
from opsgate.cli.context import CliConfig, echo_json, json_option, pass_config
from opsgate.cli.render import action_json, console
from opsgate.errors import InvalidInput, OpsgateError, did_you_mean
from opsgate.ids import short_ids
from opsgate.models import ACTIVE_STATES, TERMINAL_STATES, Action, ActionState, Identity
from opsgate.store.base import ActionQuery

# Stored states (`proposed` never is) plus groups people think in.
STATES = {s.value: frozenset({s}) for s in ActionState if s is not ActionState.PROPOSED}
STATE_GROUPS = {
    # Approved .. rolling back: what holds a target (a new proposal on it is refused).
    "active": frozenset(ACTIVE_STATES),
    # Not finished yet: waiting for approval, or active.
    "open": frozenset(ACTIVE_STATES | {ActionState.PENDING_APPROVAL}),
    "pending": frozenset({ActionState.PENDING_APPROVAL}),
    "finished": frozenset(TERMINAL_STATES),
}
MAX_LIMIT = 10_000
MAX_FILTER_LENGTH = 256
_DURATION = re.compile(r"(\d{1,6})([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_states(values: Sequence[str]) -> frozenset[ActionState]:
    wanted: set[ActionState] = set()
    known = {**STATES, **STATE_GROUPS}
    for raw in values:
        for name in (part.strip().lower() for part in raw.split(",")):
            if name not in known:
                raise InvalidInput(
                    "--state",
                    f"unknown state {name!r}{did_you_mean(name, sorted(known))} "
                    f"(states: {', '.join(STATES)}; groups: {', '.join(STATE_GROUPS)})",
                )
            wanted |= known[name]
    return frozenset(wanted)


def parse_since(value: str | None, now: datetime) -> datetime | None:
    """`--since 2h` (s, m, h, d, w; combinable: 1h30m) or an RFC 3339 time/date."""
    if value is None:
        return None
    text = value.strip()
    if text and _DURATION.sub("", text) == "":
        seconds = sum(int(n) * _UNITS[u] for n, u in _DURATION.findall(text))
        try:
            return now - timedelta(seconds=seconds)
        except OverflowError:
            raise InvalidInput("--since", f"{value!r} reaches before year 1") from None
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None
    except ValueError:
        at = None
    if at is None:
        raise InvalidInput(
            "--since", f"{value!r} is neither a duration (30m, 2h, 7d) nor a time (2026-12-01)"
        )
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _values(option: str, values: Sequence[str]) -> frozenset[str]:
    found: set[str] = set()
    for raw in values:
        for value in (v.strip() for v in raw.split(",")):
            if not value or len(value) > MAX_FILTER_LENGTH or not value.isprintable():
                raise InvalidInput(option, f"{raw!r} is not a usable filter value")
            found.add(value)
    return frozenset(found)


def warn_unknown(config: CliConfig, query: ActionQuery) -> None:
    """A filter value today's catalog or bundle does not know is likely a typo: say so on
    stderr (old actions may still carry it, so it is a warning, not an error)."""
    from opsgate.policies.engine import bundle_environments

    known_envs = bundle_environments(config.settings.policies)
    try:
        known_types: frozenset[str] | None = frozenset(config.catalog.types)
    except OpsgateError:  # listing history must work without today's catalog
        known_types = None
    for option, values, known in (
        ("--env", query.environments, known_envs),
        ("--action", query.action_types, known_types),
    ):
        for value in sorted(values - (known or values)):
            click.echo(
                f"warning: {option} {value!r} is not known to the "
                f"{'policy bundle' if option == '--env' else 'catalog'}"
                f"{did_you_mean(value, known or ())}",
                err=True,
            )


def age(at: datetime, now: datetime) -> str:
    seconds = max(0, int((now - at).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def actions_list_table(
    actions: Sequence[Action], ids: dict[str, str], *, wide: bool, now: datetime
) -> Table:
    table = Table(title_justify="left", box=None, pad_edge=False)
    # The id column never wraps or shortens: a cut id cannot be pasted into the next
    # command. The other columns fold to make room.
    id_width = max((len(ids.get(a.id, a.id)) for a in actions), default=2)
    table.add_column("ID", no_wrap=True, min_width=id_width)
    for name in ("ACTION", "TARGET", "ENV", "STATE", "AGE"):
        table.add_column(name, overflow="fold")
    if wide:
        for name in ("APPROVALS", "PROPOSER"):
            table.add_column(name, overflow="fold")
    for action in actions:
        row = [
            ids.get(action.id, action.id),
            escape(action.action_type),
            escape(action.target),
            escape(action.environment),
            action.state.value,
            age(action.created_at, now),
        ]
        if wide:
            roles = "|".join(action.approver_roles) or "any"
            row += [
                f"{action.required_approvals} ({escape(roles)})",
                escape(f"{action.proposer.id} ({action.proposer.kind})"),
            ]
        table.add_row(*row)
    return table


@click.command("list")
@click.option(
    "--state",
    "states",
    multiple=True,
    metavar="STATE",
    help="A state or group (active, open, pending, finished); repeatable or comma-separated.",
)
@click.option(
    "--env",
    "environments",
    multiple=True,
    help="Environment; repeatable.",
    shell_complete=complete_environments,
)
@click.option(
    "--action",
    "action_types",
    multiple=True,
    help="Action type; repeatable.",
    shell_complete=complete_action_types,
)
@click.option("--target", "targets", multiple=True, help="Target; repeatable.")
@click.option("--mine", is_flag=True, help="Only actions you proposed.")
@click.option("--proposer", help="Only actions this principal proposed.")
@click.option("--since", help="Created within a duration (30m, 2h, 7d) or since a time.")
@click.option(
    "--limit",
    type=click.IntRange(1, MAX_LIMIT),
    default=50,
    show_default=True,
    help="At most this many, newest first.",
)
@click.option("--wide", is_flag=True, help="Full ids and more columns.")
@json_option
@pass_config
def list_actions(
    config: CliConfig,
    states: tuple[str, ...],
    environments: tuple[str, ...],
    action_types: tuple[str, ...],
    targets: tuple[str, ...],
    mine: bool,
    proposer: str | None,
    since: str | None,
    limit: int,
    wide: bool,
    as_json: bool,
) -> None:
    """Actions, newest first: what waits, what holds a target, what ran.

    Ids are shown as their shortest unique prefix; every command takes such a prefix
    (at least 6 characters). --wide or --json show full ids.
    """
    now = datetime.now(UTC)
    if mine and proposer is not None:
        raise InvalidInput("--mine", "give --mine or --proposer, not both")
    query = ActionQuery(
        states=parse_states(states),
        environments=_values("--env", environments),
        action_types=_values("--action", action_types),
        targets=_values("--target", targets),
        proposer_id=proposer.strip() if proposer is not None else None,
        since=parse_since(since, now),
        limit=limit,
    )
    if query.proposer_id is not None:
        _values("--proposer", [query.proposer_id])
    if mine:
        query = dataclasses.replace(query, proposer_id=config.identity().id)
    warn_unknown(config, query)
    # What is past its approval window is expired first, so `active` means active.
    config.expire_due()
    found = config.store.find_actions(query)
    if as_json:
        echo_json([action_json(a, config.catalog) for a in found])
        return
    if not found:
        click.echo("no actions match", err=True)
        return
    ids = {a.id: a.id for a in found} if wide else short_ids(config.store, (a.id for a in found))
    console().print(actions_list_table(found, ids, wide=wide, now=now))


def time_left(expires_at: datetime | None, now: datetime) -> str:
    if expires_at is None:
        return "-"
    seconds = int((expires_at - now).total_seconds())
    return "due" if seconds <= 0 else age(now - timedelta(seconds=seconds), now)


def may_approve(
    config: CliConfig, me: Identity, action: Action, approved_by: set[str], now: datetime
) -> bool:
    """What `approve` would accept from `me` now (without recording anything): not their
    own, not an agent, not already counted, and the policy's approval rule allows."""
    if me.id == action.proposer.id or me.kind != "human" or me.id in approved_by:
        return False
    return bool(config.gate.approval_evaluation(action, me, now).result.allow)


def show_queue(config: CliConfig, actions: Sequence[Action], mine: bool, as_json: bool) -> None:
    """`opsgate queue`: progress (1 of 2), roles, time left and the reason, oldest first."""
    now = datetime.now(UTC)
    me = config.identity() if mine else None
    rows = []
    for action in actions:
        approvals = config.store.approvals_for(action.id)
        # Only approvals of the current spec count, as `approve` counts them.
        counted = {a.approver.id for a in approvals if a.spec_hash == action.spec_hash}
        if me is not None and not may_approve(config, me, action, counted, now):
            continue
        rows.append((action, sorted(counted)))
    if as_json:
        documents = []
        for action, by in rows:
            document = action_json(action, config.catalog)
            left = (action.expires_at - now).total_seconds() if action.expires_at else None
            document["approvals"] = {
                "count": len(by),
                "required": action.required_approvals,
                "by": by,
            }
            document["expires_in_seconds"] = None if left is None else max(0, round(left))
            documents.append(document)
        echo_json(documents)
        return
    if not rows:
        click.echo("nothing you may approve waits" if mine else "nothing waits for approval")
        return
    ids = short_ids(config.store, (a.id for a, _ in rows))
    table = Table(box=None, pad_edge=False)
    table.add_column("ID", no_wrap=True, min_width=max(len(i) for i in ids.values()))
    for name in ("ACTION", "TARGET", "ENV", "APPROVALS", "LEFT", "PROPOSER", "REASON"):
        table.add_column(name, overflow="fold")
    for action, by in rows:
        table.add_row(
            ids[action.id],
            escape(action.action_type),
            escape(action.target),
            escape(action.environment),
            f"{len(by)} of {action.required_approvals}",
            time_left(action.expires_at, now),
            escape(action.proposer.id),
            escape(action.reason),
        )
    title = "you may approve" if mine else "waiting for approval"
    click.echo(f"{len(rows)} {title}")
    console().print(table)
