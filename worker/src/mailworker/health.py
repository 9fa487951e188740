"""Bounded liveness checks for the worker and beat, used by `mailworker health`.

A worker waits for Redis forever; a health check must answer within its timeout, so these use
their own connections with retries off and the timeout on every socket.

Three answers, with the exit codes of the monitoring-plugin convention: healthy (0), unhealthy (1)
and unknown (3). Unknown means the broker cannot be reached, so nothing can be said about the
worker or beat: restarting them would not bring Redis back, and the health timers do not count it.
A worker that does not answer just after a Sentinel failover is unknown too, for as long as its
reconnect to the new master may take (celery_config.failover_reconnect_bound): the check's own
fresh connection reaches the new master at once, the worker first waits out its old connection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import IntEnum

import redis
from celery.utils.nodenames import host_format
from kombu import Connection
from kombu.exceptions import OperationalError

from mailworker.beat import LEADER, STANDBY, BeatStatus, read_status
from mailworker.progress import Progress, judge_progress, progress_key
from mailworker.redis_client import redis_from_url, sentinel_options
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
    from mailworker.celery_app import monitor_app as app  # noqa: PLC0415 - keeps `config check` light
    from mailworker.celery_config import failover_reconnect_bound  # noqa: PLC0415 - same

    name = host_format(node or settings.node_name)
    transport = {
        **app.conf.broker_transport_options,
        **sentinel_options(settings, timeout=timeout),
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
    }
    started = time.monotonic()
    try:
        with Connection(
            app.conf.broker_url,
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
    if not any(name in reply for reply in replies):
        silent = f"{name} did not answer within {timeout:g} s"
        switched = master_switched_ago(settings, timeout=timeout)
        bound = failover_reconnect_bound(settings)
        if switched is not None and switched < bound:
            return HealthReport(
                Health.UNKNOWN,
                f"{silent}, {switched:.0f} s after a Sentinel failover named a new Redis master "
                f"(a worker may take {bound:g} s to reconnect)",
            )
        return HealthReport(Health.UNHEALTHY, silent)
    try:
        client = redis_from_url(settings.broker_url, settings, timeout=timeout, monitor=True)
        raw = client.hgetall(progress_key(name))
    except redis.RedisError as error:
        return HealthReport(Health.UNKNOWN, f"cannot reach Redis at {_where(settings)}: {error}")
    record = Progress.from_hash(raw) if raw else None
    # This host's worker wrote the record with this host's clock.
    stuck = judge_progress(record, now=time.time(), stuck_after=settings.worker_stuck_after)
    if stuck:
        return HealthReport(Health.UNHEALTHY, f"{name} answers pings but {stuck}")
    return HealthReport(Health.HEALTHY, f"{name} answered in {elapsed:.2f} s")


def master_switched_ago(settings: Settings, *, timeout: float) -> float | None:
    """Seconds since the Sentinels' failover to the current master (None: no Sentinels, none
    answered, or the master was never switched). A Sentinel keeps, per master, how long ago the
    master took that role (role-reported-time) and the epoch of the last failover (config-epoch,
    0 until the first)."""
    if not settings.redis_sentinels:
        return None
    kwargs = sentinel_options(settings, timeout=timeout)["sentinel_kwargs"]
    for host, port in settings.redis_sentinels:
        client = redis.Redis(host=host, port=port, **kwargs)
        try:
            state = client.sentinel_master(settings.redis_master_name)
        except redis.RedisError:
            continue  # a frozen or lost Sentinel: ask the next
        finally:
            client.close()
        if not state.get("config-epoch"):
            return None
        return int(state["role-reported-time"]) / 1000
    return None


def check_beat(settings: Settings, *, timeout: float, max_age: int) -> HealthReport:
    """This host's beat (MAILWORKER_BEAT_NAME) as the beats left it in Redis; see judge_beat."""
    name = host_format(settings.beat_name)
    try:
        client = redis_from_url(settings.broker_url, settings, timeout=timeout, monitor=True)
        status = read_status(client, name)
    except redis.RedisError as error:
        return HealthReport(Health.UNKNOWN, f"cannot reach Redis at {_where(settings)}: {error}")
    # A standby tries for a free lease on every tick, at least once a loop.
    return judge_beat(status, max_age=max_age, patience=2 * settings.beat_max_loop_interval)


def judge_beat(status: BeatStatus, *, max_age: int, patience: int) -> HealthReport:
    """A leader is healthy when it ticked within `max_age` seconds and holds the lease; a standby
    when it ticked within `max_age` and another beat holds the lease, or the lease is free and the
    standby tried for it within `patience` seconds. A standby is never unhealthy for waiting."""
    name, age = status.name, status.heartbeat_age
    lease = f"lease {status.lease_left:.0f} s left" if status.lease_left else "lease kept"
    if age is None:
        verdict = Health.UNHEALTHY, "has written no heartbeat (not running, or lost Redis)"
    elif age > max_age:
        verdict = Health.UNHEALTHY, f"last ticked {age:.0f} s ago (limit {max_age} s)"
    elif status.holder == name and status.role == STANDBY:
        # Restarted after a crash: the lease of its dead predecessor (another token) runs out.
        verdict = (
            Health.HEALTHY,
            f"stands by, ticked {age:.0f} s ago; an earlier process of this beat holds the "
            f"lease ({lease}), taken over when it ends",
        )
    elif status.holder == name:
        verdict = Health.HEALTHY, f"leads ({lease}), ticked {age:.0f} s ago"
    elif status.role == LEADER:
        # It finds out at its next tick and exits; the process manager restarts it as a standby.
        holder = status.holder or "no beat"
        verdict = (
            Health.UNHEALTHY,
            f"ticked as the leader {age:.0f} s ago but {holder} holds the lease",
        )
    elif status.holder is not None:
        verdict = (
            Health.HEALTHY,
            f"stands by, ticked {age:.0f} s ago; {status.holder} leads ({lease})",
        )
    elif age <= patience:
        verdict = (
            Health.HEALTHY,
            f"stands by, ticked {age:.0f} s ago; the lease is free and it takes it at its next "
            "tick",
        )
    else:
        verdict = (
            Health.UNHEALTHY,
            f"stands by but last tried for the free lease {age:.0f} s ago (limit {patience} s)",
        )
    health, message = verdict
    return HealthReport(health, f"beat {name} {message}")


def _where(settings: Settings) -> str:
    if settings.redis_sentinels:
        sentinels = ",".join(f"{host}:{port}" for host, port in settings.redis_sentinels)
        return f"master {settings.redis_master_name} of Sentinels {sentinels}"
    return mask_url(settings.broker_url)
