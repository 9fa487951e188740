"""kombu's Redis transport with leases on unacknowledged messages and one Redis client per channel.

Leases. kombu's Redis transport keeps every delivered, unacknowledged message in the hash
`unacked` and its delivery time in the sorted set `unacked_index`; every consumer sweeps that set
and puts back on its queue any message delivered more than `visibility_timeout` seconds ago,
whoever holds it. Alone, that makes the timeout a bet on the longest task (and retry countdown):
too short and a running task runs twice, too long and a dead worker's tasks wait that long.
Here the worker holding a message renews its lease: every `unacked_lease_interval` seconds its
main process sets the score of each tag it still holds to the current time (ZADD XX, so a tag
acknowledged or restored meanwhile is never added back). The timeout then only has to outlast a
few missed renewals, and a dead worker's tasks come back within about timeout + restore interval.
The tags live in a registry of the process, not in the channel's QoS, because a channel closed on
a connection loss forgets its tags while their tasks still run and are acknowledged later. In a
worker, only the tags of requests Celery still holds (reserved, running or waiting for their ETA)
are renewed: on a connection loss Celery drops the requests it had not started (prefetched, or
waiting for a retry's countdown) without a word to the transport, and their messages must then
come back after the timeout, not wait for the worker's restart.

Only a process that renews leases sweeps (kombu lets any consumer do it: the CLI, a health
check's ping, Flower). A process that does not renew leases has no business judging whether
the holder of a lease is alive, and might run with another timeout. A worker also waits one
visibility timeout after it connects, or after its renewals failed, before it sweeps: after a
Redis outage every live worker gets that long to reconnect and renew its leases.

Deliveries recorded. A message taken from its queue is in Redis only as the unacked entry this
process writes right after; a failed write would drop it. The write is tried again once through
a fresh connection (QoS.append: after a Sentinel failover the pool held connections to the old
master). A publish that fails on a connection error is tried once more the same way: otherwise
each stale connection in the pool fails one publish after a socket timeout.

One client per channel.

kombu's Redis channel builds a new `redis.Redis` for every synchronous operation: the unacked
bookkeeping on each delivery and each ack, every fanout publish (task events) and every enqueue.
Building one copies redis-py's response-callback table (about 165 entries, redis-py#3624), a
cost paid several times per task. A client only wraps the channel's connection pool and is
thread-safe, so the channel keeps one per pool (a new pool, after a fork or a reconnect, gets a
new client). docs/benchmarks.md has the measured saving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, resolve_transport
from kombu.transport import redis as kombu_redis

SCHEMES = ("redis", "rediss", "sentinel")
LEASE_INTERVAL_OPTION = "unacked_lease_interval"
_BATCH = 500

logger = logging.getLogger(__name__)

# Delivery tag -> the sorted set holding its lease, for every message this process holds.
_held: dict[str, str] = {}


def held_tags() -> list[str]:
    """The delivery tags this process holds unacknowledged (taken, not yet acked or restored)."""
    return list(_held)


def forget_dropped(requested: set[str]) -> None:
    """Stop holding the tags Celery no longer holds a request for: their leases run out and
    Redis redelivers the messages after the visibility timeout."""
    dropped = [tag for tag in held_tags() if tag not in requested]
    for tag in dropped:
        _held.pop(tag, None)
    if dropped:
        logger.info(
            "%d unacknowledged task(s) no longer held by this worker (dropped on a connection "
            "loss): their leases are not renewed, Redis redelivers them",
            len(dropped),
        )


def celery_request_tags() -> set[str]:
    """The delivery tags of the requests this worker holds: reserved (prefetched or running) and
    scheduled (waiting for their ETA)."""
    from celery.worker import state  # noqa: PLC0415 - a worker's module, imported in workers only

    requests = [*state.reserved_requests, *state.active_requests, *state.scheduled_requests]
    return {
        tag
        for request in requests
        if (tag := getattr(getattr(request, "message", None), "delivery_tag", None)) is not None
    }


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        # The message has left its queue (BRPOP) and is in no unacked entry yet: if this write's
        # error reached the consumer it would reconnect and drop it, lost for good. After a
        # Sentinel failover the BRPOP comes from the new master while the pool's idle
        # connections still point at the old one (a frozen host answers nothing until the
        # socket timeout). The same tag and payload twice are harmless, if the first write did
        # land.
        _once_more(
            self.channel,
            f"record delivered task {delivery_tag} as unacknowledged",
            super().append,
            message,
            delivery_tag,
        )
        _held[delivery_tag] = self.channel.unacked_index_key

    def ack(self, delivery_tag: str) -> None:
        # Whether or not the ack reached Redis, this process is done with the message: a failed
        # ack leaves it to be redelivered after the timeout (the tasks are idempotent).
        try:
            super().ack(delivery_tag)
        finally:
            _held.pop(delivery_tag, None)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)
        finally:
            _held.pop(delivery_tag, None)

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        super().restore_by_tag(tag, client=client, leftmost=leftmost)
        _held.pop(tag.decode() if isinstance(tag, bytes) else tag, None)

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        if self.channel.connection.may_restore():
            super().restore_visible(*args, **kwargs)


class _OneSyncClient:
    """Mixin for kombu's Redis channels: one synchronous client per connection pool."""

    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is not None and self._pool is None and self.connection.client is None:
            # Celery closes the connection after a connection error, and the channel's close
            # restores its unacknowledged messages; kombu dropped the pool and the connection
            # details already, so building a new pool raises AttributeError, which Celery calls
            # unrecoverable: the worker exits (seen once in about eight Sentinel failovers in
            # tests/test_sentinel.py). The last client still reaches Redis (a Sentinel-managed
            # pool finds the new master), so the restore goes through it.
            return client
        pool = self.pool
        if client is None or client.connection_pool is not pool:
            client = self._sync_client = super()._create_client()
        return client


class _PublishOnFreshConnection:
    """Mixin for kombu's Redis channels: a publish (its routing lookup or its write) that fails
    on a connection error drops the pool's connections and is tried once more through a new one.

    After a Sentinel failover the pool's idle connections still point at the old master; each
    publish through one hangs for a socket timeout and fails, one stale connection at a time. A
    new connection asks the Sentinels for the master. Should a failed write have landed after
    all (a slow Redis, not a frozen one), the task is queued twice, as a Celery publish retry
    would queue it: a second delivery, which the tasks absorb as they absorb a redelivery (they
    are idempotent: docs/reliability.md)."""

    def get_table(self, exchange: str) -> Any:
        return _once_more(self, f"look up the queues of {exchange}", super().get_table, exchange)

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        _once_more(self, f"publish to {queue}", super()._put, queue, message, **kwargs)


def _once_more(channel: Any, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call`; on a connection error, drop the channel pool's connections and call it once more
    through a new one (a Sentinel-managed connection asks the Sentinels for the master)."""
    try:
        return call(*args, **kwargs)
    except channel.connection_errors as error:
        logger.warning("could not %s (%s); reconnecting to try once more", what, error)
        channel.pool.disconnect()
        return call(*args, **kwargs)


class Channel(_PublishOnFreshConnection, _OneSyncClient, kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel
    _lease_tref: Any = None
    # monotonic time from which this process may sweep; None: it renews no leases, never sweeps.
    _restore_after: float | None = None
    # In a worker: the tags Celery still holds requests for (None: every tag held, as in a test).
    _still_held: Callable[[], set[str]] | None = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """What a worker's consumer calls in its main process: kombu's timers, plus the leases."""
        super().register_with_event_loop(connection, loop)
        options = connection.client.transport_options
        interval = options.get(LEASE_INTERVAL_OPTION) or 0
        if self._lease_tref is not None:
            self._lease_tref.cancel()
            self._lease_tref = None
        if interval <= 0:  # leases off: kombu's own behaviour, sweeps included
            self._restore_after = time.monotonic()
            return
        self._restore_after = time.monotonic() + self._visibility_timeout(connection)
        self._still_held = celery_request_tags
        self._lease_tref = loop.call_repeatedly(interval, self.renew_leases, connection)

    def may_restore(self) -> bool:
        return self._restore_after is not None and time.monotonic() >= self._restore_after

    def renew_leases(self, connection: Any) -> int:
        """Set the lease of every tag this process holds to now; the number renewed. Never
        raises: a worker that cannot reach Redis keeps running (Celery reconnects it)."""
        if self._still_held is not None and _held:
            forget_dropped(self._still_held())
        tags = held_tags()
        channels = [channel for channel in self.channels if not channel.closed]
        if not tags or not channels:
            return 0
        channel = channels[0]
        now = time.time()
        try:
            with channel.conn_or_acquire() as client:
                pipe = client.pipeline(transaction=False)
                for start in range(0, len(tags), _BATCH):
                    batch = tags[start : start + _BATCH]
                    pipe.zadd(
                        channel.unacked_index_key, dict.fromkeys(batch, now), xx=True, ch=True
                    )
                renewed = sum(pipe.execute())
        except Exception as error:  # a timer callback must not stop the worker's event loop
            logger.warning(
                "could not renew the leases of %d unacknowledged tasks: %s; other workers "
                "take them over after %s s without renewal",
                len(tags),
                error,
                self._visibility_timeout(connection),
            )
            # Our view of other workers' leases is as stale as theirs of ours.
            self._restore_after = time.monotonic() + self._visibility_timeout(connection)
            return 0
        return renewed

    @staticmethod
    def _visibility_timeout(connection: Any) -> float:
        options = connection.client.transport_options
        return options.get("visibility_timeout", kombu_redis.Channel.visibility_timeout)


class SentinelChannel(_PublishOnFreshConnection, _OneSyncClient, kombu_redis.SentinelChannel):
    QoS = QoS


class SentinelTransport(Transport):
    """kombu's SentinelTransport is its Transport with these two attributes; deriving from ours
    keeps whatever this module's Transport adds for sentinel:// too."""

    default_port = kombu_redis.SentinelTransport.default_port
    Channel = SentinelChannel


_TRANSPORTS = {"redis": "Transport", "rediss": "Transport", "sentinel": "SentinelTransport"}


def install() -> None:
    """Make redis://, rediss:// and sentinel:// URLs in this process use this module's transports.

    Through kombu's public alias table rather than Celery's `broker_transport`, so URLs keep their
    scheme: `Connection.as_uri()` and Flower's broker page still see redis://. kombu reads the
    table the first time a scheme is resolved and keeps that class for the process; the worker,
    beat, Flower and the CLI's task commands import the app (which calls this) before they
    connect. A process that connected first (the CLI's broker-only commands, if a later command
    in the same process imports the app) keeps kombu's own transport, which only builds more
    clients. A kombu that stops resolving the table's entries fails here, at import.
    """
    for scheme in SCHEMES:
        TRANSPORT_ALIASES[scheme] = f"{__name__}:{_TRANSPORTS[scheme]}"
        resolved = resolve_transport(scheme)
        if resolved is not globals()[_TRANSPORTS[scheme]]:
            raise RuntimeError(
                f"kombu resolves {scheme}:// to {resolved!r}, not {__name__}: it no "
                "longer reads kombu.transport.TRANSPORT_ALIASES; see mailworker.redis_transport"
            )
