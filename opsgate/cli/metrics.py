"""metrics serve: Prometheus exposition of opsgate's metrics, read from the store per scrape."""

from __future__ import annotations

import click

from opsgate.cli.context import CliConfig, pass_config
from opsgate.cli.execution import sigterm_as_interrupt
from opsgate.reports import exporter


@click.group()
def metrics() -> None:
    """Prometheus metrics: actions, policy blocks, verification, rollbacks, workers."""


@metrics.command()
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=exporter.DEFAULT_PORT,
    show_default=True,
    help="Port to listen on (0 picks a free one).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 for every interface).",
)
@pass_config
def serve(config: CliConfig, port: int, host: str) -> None:
    """Serve /metrics until Ctrl-C or SIGTERM; every scrape reads the store afresh.

    A scrape that cannot read the store exposes opsgate_store_up 0 instead of failing.
    """
    codes = exporter.bundle_deny_codes(config.settings.policies)
    collector = exporter.StoreCollector(config.store, lease=config.settings.lease, deny_codes=codes)
    problem = collector.probe()
    if problem is not None:
        # Serve anyway: the database may come back, and store_up 0 is what alerts on it.
        click.echo(f"warning: {problem}; serving opsgate_store_up 0 until it is readable", err=True)
    server, thread = exporter.serve(
        config.store, port, host, lease=config.settings.lease, deny_codes=codes
    )
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving metrics on http://{shown}:{server.server_port}/metrics", err=True)
    try:
        with sigterm_as_interrupt():
            while thread.is_alive():
                thread.join(timeout=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        exporter.stop(server, thread)
    click.echo("metrics server stopped", err=True)
