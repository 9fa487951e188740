"""kombu's Redis transport with one synchronous Redis client per channel instead of one per call.

kombu's Redis channel builds a new `redis.Redis` for every synchronous operation: the unacked
bookkeeping on each delivery and each ack, every fanout publish (task events) and every enqueue.
Building one copies redis-py's response-callback table (about 165 entries, redis-py#3624), a
cost paid several times per task. A client only wraps the channel's connection pool and is
thread-safe, so the channel keeps one per pool (a new pool, after a fork or a reconnect, gets a
new client). docs/benchmarks.md has the measured saving.

The same holds for kombu's Sentinel channel (sentinel:// URLs): its pool is a Sentinel-managed
pool that asks the Sentinels for the master on each new connection and drops its connections
when the master turns into a replica, so one client per pool follows a failover as kombu's own
per-call clients do.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import TRANSPORT_ALIASES, resolve_transport
from kombu.transport import redis as kombu_redis

SCHEMES = ("redis", "rediss", "sentinel")


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


class Channel(_OneSyncClient, kombu_redis.Channel):
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(_OneSyncClient, kombu_redis.SentinelChannel):
    pass


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
