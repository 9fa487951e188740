"""`mailworker metrics serve|show`: the application's own Prometheus metrics."""

from __future__ import annotations

import logging
import sys

import click
from prometheus_client import generate_latest

from mailworker.settings import load_settings


@click.group()
def metrics() -> None:
    """Queue depth and age, unacked messages, sync lag, outbox, task attempts, beat's tick."""


@metrics.command()
@click.option("--address", help="Listen address. Default: MAILWORKER_METRICS_ADDRESS.")
@click.option(
    "--port", type=click.IntRange(1, 65535), help="Listen port. Default: MAILWORKER_METRICS_PORT."
)
def serve(address: str | None, port: int | None) -> None:
    """Serve /metrics for Prometheus in the foreground (what celery-metrics runs)."""
    from mailworker import metrics as app_metrics  # noqa: PLC0415 - loads Celery, SQLAlchemy
    from mailworker.settings import PrivateAddress  # noqa: PLC0415

    settings = load_settings()
    try:
        listen = PrivateAddress().parse(address) if address else settings.metrics_address
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--address") from None
    logging.basicConfig(
        level=settings.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        app_metrics.serve(settings, listen, port or settings.metrics_port)
    except OSError as error:
        raise click.ClickException(f"cannot listen on {listen}: {error.strerror}") from None
    except KeyboardInterrupt:
        pass


@metrics.command()
def show() -> None:
    """Print one scrape's metrics (the text format Prometheus reads)."""
    from mailworker import metrics as app_metrics  # noqa: PLC0415

    registry, collector = app_metrics.registry_for(load_settings())
    try:
        click.echo(generate_latest(registry).decode(), nl=False)
    finally:
        collector.close()
