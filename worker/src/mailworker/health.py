"""Bounded liveness checks for the worker and beat, used by `mailworker health`.

A worker waits for Redis forever; a health check must answer within its timeout, so these use
their own connections with retries off and the timeout on every socket.

Three answers, with the exit codes of the monitoring-plugin convention: healthy (0), unhealthy (1)
and unknown (3). Unknown means the broker cannot be reached, so nothing can be said about the
worker or beat: restarting them would not bring Redis back, and the health timers do not count it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import IntEnum

import redis
from celery.utils.nodenames import host_format
from kombu import Connection
from kombu.exceptions import OperationalError

from mailworker.beat import heartbeat_age
from mailworker.redis_client import redis_from_url
from mailworker.settings import Settings, mask_url


class Health(IntEnum):
    """The verdict, valued as the exit code of `mailworker health`."""

    HEALTHY = 0
    UNHEALTHY = 1
    UNKNOWN = 3


@dataclass(frozen=True)
class HealthReport:
    health: Health
    message: str


def check_worker(settings: Settings, *, timeout: float, node: str | None = None) -> HealthReport:
    """Ping `node` (default: this host's node name) and wait at most about `timeout` seconds."""
    from mailworker.celery_app import app  # noqa: PLC0415 - keeps `config check` light

    name = host_format(node or settings.node_name)
    transport = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
    started = time.monotonic()
    try:
        with Connection(
            settings.broker_url,
            connect_timeout=timeout,
            transport_options=transport,
            ssl=app.conf.broker_use_ssl or False,
        ) as connection:
            connection.ensure_connection(max_retries=0, timeout=timeout)
            replies = app.control.ping(destination=[name], timeout=timeout, connection=connection)
    except (OperationalError, redis.RedisError, OSError) as error:
        return HealthReport(
            Health.UNKNOWN, f"cannot reach the broker at {_where(settings)}: {error}"
        )
    elapsed = time.monotonic() - started
    for reply in replies:
        if name in reply:
            return HealthReport(Health.HEALTHY, f"{name} answered in {elapsed:.2f} s")
    return HealthReport(Health.UNHEALTHY, f"{name} did not answer within {timeout:g} s")


def check_beat(settings: Settings, *, timeout: float, max_age: int) -> HealthReport:
    """Beat is healthy when its heartbeat is at most `max_age` seconds old."""
    try:
        age = heartbeat_age(redis_from_url(settings.broker_url, settings, timeout=timeout))
    except redis.RedisError as error:
        return HealthReport(Health.UNKNOWN, f"cannot reach Redis at {_where(settings)}: {error}")
    if age is None:
        return HealthReport(
            Health.UNHEALTHY, "beat has written no heartbeat (not running, or lost Redis)"
        )
    if age > max_age:
        return HealthReport(
            Health.UNHEALTHY, f"beat's last tick was {age:.0f} s ago (limit {max_age} s)"
        )
    return HealthReport(Health.HEALTHY, f"beat ticked {age:.0f} s ago")


def _where(settings: Settings) -> str:
    return mask_url(settings.broker_url)
