"""`mailworker health worker|beat [--timeout S]`: one line, and exit 0 when healthy, 1 when not,
3 when it cannot tell (the broker is unreachable)."""

from __future__ import annotations

import sys

import click

from mailworker.health import Health, HealthReport, check_beat, check_worker
from mailworker.settings import load_settings


@click.group()
def health() -> None:
    """Check this host's worker or beat (the systemd health timers call these)."""


@health.command()
@click.option("--timeout", type=click.FloatRange(min=0.1), help="Seconds to wait for the reply.")
@click.option("--node", help="Node name to ping (default: MAILWORKER_NODE_NAME on this host).")
def worker(timeout: float | None, node: str | None) -> None:
    """Ping this host's worker node through the broker."""
    settings = load_settings()
    _report(check_worker(settings, timeout=timeout or settings.health_timeout, node=node))


@health.command()
@click.option("--timeout", type=click.FloatRange(min=0.1), help="Seconds to wait for Redis.")
@click.option(
    "--max-age", type=click.IntRange(min=1), help="Oldest acceptable heartbeat in seconds."
)
def beat(timeout: float | None, max_age: int | None) -> None:
    """Check this host's beat: a leader ticking with its lease, or a standby waiting for it."""
    settings = load_settings()
    _report(
        check_beat(
            settings,
            timeout=timeout or settings.health_timeout,
            max_age=max_age or settings.beat_heartbeat_max_age,
        )
    )


_PREFIX = {Health.HEALTHY: "ok: ", Health.UNHEALTHY: "unhealthy: ", Health.UNKNOWN: "unknown: "}


def _report(report: HealthReport) -> None:
    click.echo(_PREFIX[report.health] + report.message)
    sys.exit(int(report.health))
