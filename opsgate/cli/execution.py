"""run, worker, rollback: carry out approved actions with verification and rollback."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape
from rich.table import Table

from opsgate.cli.context import CliConfig, echo_json, finite_seconds, json_option, pass_config
from opsgate.cli.ids import ACTION_ID
from opsgate.cli.live import PlainView, view_for
from opsgate.cli.render import console, details_json, outcome_text, shown
from opsgate.cli.watch import refuse_if_handed_over, resumable, resume_here
from opsgate.errors import ActionFailed, ConfigError, Refused
from opsgate.executor.executor import Executor, ExecutorEvent
from opsgate.ids import log_id
from opsgate.models import ActionState
from opsgate.reports.exporter import bundle_deny_codes, serve_in_background
from opsgate.store.base import StoreError
from opsgate.views import worker_rows

if TYPE_CHECKING:
    from opsgate.audit_signing import Checkpointer

S = ActionState
EXPIRY_CHECK_SECONDS = 10.0


def build_executor(
    config: CliConfig,
    on_event: Callable[[ExecutorEvent], None] | None,
    *,
    concurrency: int | None = None,
    worker_id: str | None = None,
) -> Executor:
    config.provider()  # nothing runs that cannot be verified: say so before anything opens
    config.store  # noqa: B018 - refused in client mode: only workers hold the database
    return config.app.build_executor(on_event, concurrency=concurrency, worker_id=worker_id)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (systemd, Kubernetes) stops a worker the way Ctrl-C does."""

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_finishing(executor: Executor, what: str, *, interrupted: bool = False) -> None:
    """Wait for held actions; a first interrupt drains, a second exits at once."""
    while True:
        try:
            executor.wait_idle()
            return
        except KeyboardInterrupt:
            if interrupted:
                click.echo("stopping now; a lapsed lease is recovered by the next worker", err=True)
                os._exit(130)
            interrupted = True
            executor.drain()
            click.echo(
                f"finishing {what}: running steps end, verifications are handed over to the "
                "next worker; interrupt again to stop now",
                err=True,
            )


def outcome_line(config: CliConfig, action_id: str) -> tuple[ActionState, str]:
    details = config.gate.details(action_id)
    return details.action.state, outcome_text(details)


def finish(config: CliConfig, action_id: str, as_json: bool) -> None:
    """Print how the action ended; anything but success is a non-zero exit."""
    state, line = outcome_line(config, action_id)
    if as_json:
        echo_json(details_json(config.gate.details(action_id), config.catalog))
    elif state is S.SUCCEEDED:
        click.echo(shown(line))
    if state is S.BLOCKED_AT_EXECUTION:
        decisions = [d for d in config.store.decisions_for(action_id) if d.phase == "execute"]
        codes = decisions[-1].deny_codes if decisions else []
        messages = "; ".join(d.message or d.code for d in decisions[-1].deny) if decisions else ""
        raise Refused(f"blocked at execution: {messages or ', '.join(codes)}", codes)
    if state is not S.SUCCEEDED:
        raise ActionFailed(line)


@click.command()
@click.argument("action_id", type=ACTION_ID)
@json_option
@pass_config
def run(config: CliConfig, action_id: str, as_json: bool) -> None:
    """Run one approved action here: re-check, run, verify, roll back if it made things worse.

    Exit 0 when verified, 3 when blocked at execution, 1 for any other end. After a
    Ctrl-C the action is handed over (exit 130): a worker resumes it, or `opsgate run
    ID` resumes it here.
    """
    if config.remote is not None:  # client mode: the server runs it
        from opsgate.cli.remote_exec import remote_run

        return remote_run(config, action_id, as_json)
    principal = config.identity()  # who asked for this run, recorded with its claim
    checkpointer = config.checkpointer()
    config.gate.expire_due()
    action = config.store.get_action(action_id)
    if action is not None:
        # Who may trigger a run is the bundle's call (authz), recorded when refused.
        config.gate.authorize("run", principal, action)
    title = f"{action.action_type} {action.target} ({action.environment})" if action else action_id
    view = PlainView() if as_json else view_for(action_id, f"{action_id}  {title}")
    resuming = resumable(config, action)  # left under way by an interrupted `run`
    executor = build_executor(config, None if as_json else view)
    try:
        with sigterm_as_interrupt(), view:
            executor.start()
            if resuming:
                resume_here(executor, action_id)
                wait_finishing(executor, "this action")
            else:
                claimed = executor.claim(action_id, principal=principal)
                if claimed is not None and claimed.state is S.EXECUTING:
                    executor.launch(action_id)
                    wait_finishing(executor, "this action")
    finally:
        executor.close()
        sign_head(config, checkpointer)
    refuse_if_handed_over(config, action_id)
    finish(config, action_id, as_json)


def sign_head(config: CliConfig, checkpointer: Checkpointer | None) -> None:
    """Sign the audit head if it moved; a failure here loses no event, only delays the
    signature to the next checkpoint, so it is reported and not raised."""
    if checkpointer is None:
        return
    try:
        checkpointer.maybe_sign(config.store, datetime.now(UTC))
    except StoreError as exc:
        click.echo(f"could not sign the audit head: {exc}", err=True)


@click.command()
@click.option("--once", is_flag=True, help="Run what is approved now, wait for it, then exit.")
@click.option(
    "--concurrency", type=click.IntRange(1, 256), help="Runner steps at once (default 4)."
)
@click.option(
    "--max-in-flight",
    type=click.IntRange(1, 100_000),
    default=1000,
    show_default=True,
    help="Actions held at once, verifying included.",
)
@click.option(
    "--poll", type=click.FloatRange(0.05, 60), default=1.0, show_default=True,
    callback=finite_seconds,
    help="Seconds between looks for newly approved actions.",
)  # fmt: skip
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    help="Serve Prometheus metrics (read from the store) on 127.0.0.1:PORT meanwhile.",
)
@click.option(
    "--name",
    envvar="OPSGATE_WORKER_NAME",
    help="This worker's principal id in the audit trail (default host:pid:random).",
)
@pass_config
def worker(
    config: CliConfig,
    once: bool,
    concurrency: int | None,
    max_in_flight: int,
    poll: float,
    metrics_port: int | None,
    name: str | None,
) -> None:
    """Claim approved actions and run, verify and roll them back; Ctrl-C finishes cleanly."""
    if config.server_url is not None:
        raise ConfigError(
            "OPSGATE_URL is set: a worker is of the trusted tier and works on the database "
            "itself (OPSGATE_DB); run it without OPSGATE_URL"
        )
    from opsgate.auth.workers import register_worker_principal, worker_name

    name = worker_name(name)
    view = PlainView(prefix_ids=True)
    checkpointer = config.checkpointer()
    executor = build_executor(config, view, concurrency=concurrency, worker_id=name)
    # Who this worker is, recorded before it claims anything (a principal of kind worker).
    principal = register_worker_principal(
        config.store, executor.worker_id, datetime.now(UTC), config.settings.lease
    )
    claimed = 0
    stop_metrics = serve_in_background(
        config.store,
        metrics_port,
        lease=config.settings.lease,
        deny_codes=bundle_deny_codes(config.settings.policies),
    )
    try:
        with sigterm_as_interrupt():
            executor.start()
            click.echo(
                f"worker {executor.worker_id} started (as {principal.os_user} on "
                f"{principal.hostname})",
                err=True,
            )
            for warning in config.catalog.warnings:
                click.echo(f"catalog warning: {warning}", err=True)
            try:
                next_expiry = 0.0
                backoff = poll
                while True:
                    try:
                        if time.monotonic() >= next_expiry:
                            config.gate.expire_due()
                            next_expiry = time.monotonic() + EXPIRY_CHECK_SECONDS
                        claimed += len(executor.recover_lapsed())
                        while executor.in_flight < max_in_flight:
                            action = executor.claim()
                            if action is None:
                                break
                            claimed += 1
                            if action.state is S.EXECUTING:
                                executor.launch(action.id)
                        if checkpointer is not None:
                            checkpointer.maybe_sign(config.store, datetime.now(UTC))
                        backoff = poll
                    except StoreError as exc:
                        # The database restarts, fails over or refused one transaction:
                        # nothing of it was written; held actions go on; look again later.
                        click.echo(f"store unavailable, retrying in {backoff:g}s: {exc}", err=True)
                        time.sleep(backoff)
                        backoff = min(backoff * 2, 5.0)
                        continue
                    if once:
                        break
                    time.sleep(poll)
                wait_finishing(executor, "held actions")
            except KeyboardInterrupt:
                executor.drain()
                click.echo(
                    "no new claims; running steps finish, verifications are handed over "
                    "(interrupt again to stop now)",
                    err=True,
                )
                wait_finishing(executor, "held actions", interrupted=True)
    finally:
        stop_metrics()
        executor.close()
        sign_head(config, checkpointer)
    click.echo(f"worker {executor.worker_id} stopped after {claimed} claims", err=True)


@click.command()
@click.argument("action_id", type=ACTION_ID)
@click.option("--reason", required=True, help="Why; goes into the audit trail.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the end.")
@json_option
@pass_config
def rollback(config: CliConfig, action_id: str, reason: str, wait: bool, as_json: bool) -> None:
    """Roll back an executing, verifying or succeeded action; the rollback is verified.

    A running action is rolled back by the worker holding it; a succeeded one here.
    """
    if config.remote is not None:  # client mode: the server rolls it back
        from opsgate.cli.remote_exec import remote_rollback

        return remote_rollback(config, action_id, reason, wait, as_json)
    identity = config.identity()
    target = config.store.get_action(action_id)
    if target is not None:
        config.gate.authorize("rollback", identity, target)
    view = PlainView() if as_json else view_for(action_id, f"rollback {action_id}")
    executor = build_executor(config, None if as_json else view)
    try:
        with sigterm_as_interrupt(), view:
            executor.start()
            action = executor.request_rollback(action_id, identity, reason)
            if action.state is S.ROLLING_BACK:
                wait_finishing(executor, "the rollback")
            elif wait:
                if not as_json:
                    click.echo(f"rollback of {action_id} requested; its worker rolls it back")
                while not (current := config.store.get_action(action_id)) or not (
                    current.state.terminal
                ):
                    time.sleep(0.5)
            else:
                click.echo(f"rollback of {action_id} requested")
                return
    finally:
        executor.close()
    state, line = outcome_line(config, action_id)
    if as_json:
        echo_json(details_json(config.gate.details(action_id), config.catalog))
    else:
        click.echo(shown(line))
    if state is not S.ROLLED_BACK:
        raise ActionFailed(line)


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Include stopped workers.")
@json_option
@pass_config
def workers(config: CliConfig, show_all: bool, as_json: bool) -> None:
    """Workers, their heartbeats and the leases they hold."""
    lease = config.settings.lease
    if config.server_url is not None:  # client mode: the server reads them
        answer = config.remote.workers(show_all)
        rows, lease = answer["workers"], float(answer["lease"])
    else:
        rows = worker_rows(config.store, lease, show_all, datetime.now(UTC))
    if as_json:
        echo_json(rows)
        return
    table = Table(title=f"workers (lease {lease:g}s)", title_justify="left")
    for column in ("id", "host", "pid", "status", "heartbeat", "leases"):
        table.add_column(column, overflow="fold")
    for row in rows:
        # A prefix every command takes; --json has the full ids.
        leases_text = ", ".join(
            f"{log_id(item['action_id'])} {item['target']}" for item in row["leases"]
        )
        cells = (
            row["id"],
            row["hostname"],
            row["pid"],
            row["status"],
            f"{row['heartbeat_age_s']:.0f}s ago",
            leases_text or "-",
        )
        # Names come from the store or, in client mode, the wire: never markup or escapes.
        table.add_row(*(escape(shown(str(cell))) for cell in cells))
    console().print(table)
