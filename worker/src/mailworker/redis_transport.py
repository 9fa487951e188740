"""kombu's Redis transport with one synchronous Redis client per channel instead of one per call.

kombu's Redis channel builds a new `redis.Redis` for every synchronous operation: the unacked
bookkeeping on each delivery and each ack, every fanout publish (task events) and every enqueue.
Building one copies redis-py's response-callback table (about 165 entries, redis-py#3624), a
cost paid several times per task. A client only wraps the channel's connection pool and is
thread-safe, so the channel keeps one per pool (a new pool, after a fork or a reconnect, gets a
new client). docs/benchmarks.md has the measured saving.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import TRANSPORT_ALIASES, get_transport_cls
from kombu.transport import redis as kombu_redis

SCHEMES = ("redis", "rediss")


class Channel(kombu_redis.Channel):
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        client = self._sync_client
        if client is None or client.connection_pool is not pool:
            client = self._sync_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Make redis:// and rediss:// URLs in this process use this transport.

    Through kombu's public alias table rather than Celery's `broker_transport`, so URLs keep their
    scheme: `Connection.as_uri()` and Flower's broker page still see redis://. kombu remembers a
    scheme's class the first time a connection resolves it, and the alias table is only read then;
    every process imports the app (which calls this) before it connects, so nothing is cached yet.
    If something did connect first, or a kombu release stops reading the table, say so at import
    rather than run with kombu's own transport unnoticed.
    """
    for scheme in SCHEMES:
        TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
    for scheme in SCHEMES:
        resolved = get_transport_cls(scheme)
        if resolved is not Transport:
            raise RuntimeError(
                f"kombu resolves {scheme}:// to {resolved!r}, not {__name__}.Transport: a broker "
                "connection was made before mailworker.redis_transport.install(), or kombu no "
                "longer reads kombu.transport.TRANSPORT_ALIASES"
            )
