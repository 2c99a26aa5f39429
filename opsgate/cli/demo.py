"""opsgate demo: the whole loop on this machine, with a demo service and a real Prometheus."""

from __future__ import annotations

import signal
import tempfile
from pathlib import Path

import click

from opsgate.cli.context import CliConfig, pass_config
from opsgate.cli.execution import sigterm_as_interrupt
from opsgate.demo.scenario import (
    PROFILES,
    DemoSetupError,
    Scenario,
    default_policies,
    signals_ignored,
)


def prepare_workdir(workdir: Path | None) -> Path:
    """A new temporary directory, or the given one if it is empty (or does not exist)."""
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="opsgate-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        raise DemoSetupError(f"--workdir {workdir} is not empty; give a new or empty directory")
    return workdir


@click.command()
@click.option(
    "--keep",
    is_flag=True,
    help="Leave the demo service and Prometheus running and print how to go on by hand.",
)
@click.option(
    "--profile",
    type=click.Choice(sorted(PROFILES)),
    default="normal",
    show_default=True,
    help="Timing: fast shortens holds and pauses (for tests).",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the database, catalog, logs and report go (default: a new temp dir).",
)
@pass_config
def demo(config: CliConfig, keep: bool, profile: str, workdir: Path | None) -> None:
    """Play the whole loop here: a bad release, proposals, blocks, an approved rollback,
    a change that opsgate rolls back by itself, and the governance report."""
    policies = default_policies(config.settings.policies)
    scenario = Scenario(prepare_workdir(workdir), PROFILES[profile], policies, keep=keep)
    interrupted = False
    with sigterm_as_interrupt():
        try:
            scenario.play()
            if keep:
                scenario.leave_running()
        except KeyboardInterrupt:
            interrupted = True
            click.echo("\ninterrupted: stopping everything the demo started", err=True)
        finally:
            with signals_ignored(signal.SIGINT, signal.SIGTERM):
                stopped = scenario.cleanup()
            if stopped:
                click.echo(f"stopped {', '.join(stopped)}", err=True)
    if interrupted:
        raise SystemExit(130)
