"""Bounded access to the broker and result backend for one-shot operator commands.

A worker waits for Redis forever (broker_connection_max_retries=None); an operator's command
must not. `make_fast_failing` turns the app's retries off and puts the command's timeout on
every socket, and the plain clients here try once (redis-py's own default retries three times
with backoff), so an unreachable Redis gives one line within about the timeout.
"""

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.sentinel
from celery import Celery
from kombu.exceptions import OperationalError
from redis.backoff import NoBackoff
from redis.retry import Retry

from mailworker.ops.errors import Unreachable
from mailworker.settings import mask_url

# kombu's Redis transport defaults (kombu/transport/redis.py, Channel attributes); the app may
# override each through broker_transport_options.
KOMBU_DEFAULTS: dict[str, Any] = {
    "global_keyprefix": "",
    "sep": "\x06\x16",
    "priority_steps": [0, 3, 6, 9],
    "unacked_key": "unacked",
    "unacked_index_key": "unacked_index",
    "visibility_timeout": 3600,
}
BINDING_PREFIX = "_kombu.binding."
# What "the server did not answer" looks like from kombu, redis-py and the socket layer; other
# OSErrors (a log file that cannot be read) are not connection problems.
CONNECTION_ERRORS = (
    OperationalError,
    redis.exceptions.RedisError,
    ConnectionError,
    TimeoutError,
    socket.gaierror,
)


def make_fast_failing(app: Celery, timeout: float) -> None:
    """Bound every broker and result-backend wait of this process by `timeout` seconds."""
    transport = dict(app.conf.broker_transport_options or {})
    transport.update(
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry_on_timeout=False,
        max_retries=1,
    )
    app.conf.update(
        broker_connection_timeout=timeout,
        broker_connection_retry=False,
        broker_connection_max_retries=0,
        broker_transport_options=transport,
        redis_socket_connect_timeout=timeout,
        redis_socket_timeout=timeout,
        redis_retry_on_timeout=False,
        result_backend_always_retry=False,
    )


def describe_failure(what: str, url: str, exc: BaseException) -> Unreachable:
    """One line naming the server (password masked) and the reason, for the operator."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return Unreachable(f"cannot reach the {what} at {mask_url(url)}: {reason}")


@dataclass(frozen=True)
class BrokerKeys:
    """kombu's key layout in the broker's Redis database, as this app configures it."""

    prefix: str = ""
    sep: str = KOMBU_DEFAULTS["sep"]
    priority_steps: tuple[int, ...] = tuple(KOMBU_DEFAULTS["priority_steps"])
    unacked_key: str = KOMBU_DEFAULTS["unacked_key"]
    unacked_index_key: str = KOMBU_DEFAULTS["unacked_index_key"]
    visibility_timeout: float = KOMBU_DEFAULTS["visibility_timeout"]

    @classmethod
    def from_app(cls, app: Celery) -> "BrokerKeys":
        options = {**KOMBU_DEFAULTS, **(app.conf.broker_transport_options or {})}
        return cls(
            prefix=str(options["global_keyprefix"] or ""),
            sep=str(options["sep"]),
            priority_steps=tuple(sorted(int(p) for p in options["priority_steps"])),
            unacked_key=str(options["unacked_key"]),
            unacked_index_key=str(options["unacked_index_key"]),
            visibility_timeout=float(options["visibility_timeout"]),
        )

    def queue_keys(self, queue: str) -> list[str]:
        """Every list that holds the queue's messages: one per priority step (kombu _q_for_pri)."""
        return [
            self.prefix + (f"{queue}{self.sep}{step}" if step else queue)
            for step in self.priority_steps
        ]

    def key(self, name: str) -> str:
        return self.prefix + name


@dataclass
class Broker:
    """A plain redis-py client on the broker database plus kombu's key layout."""

    client: redis.Redis
    keys: BrokerKeys
    url: str
    _bindings: dict[str, list[tuple[str, str]]] | None = field(default=None, repr=False)

    def bindings(self) -> dict[str, list[tuple[str, str]]]:
        """exchange -> [(routing_key, queue)] from kombu's `_kombu.binding.<exchange>` sets."""
        if self._bindings is None:
            found: dict[str, list[tuple[str, str]]] = {}
            pattern = self.keys.key(BINDING_PREFIX) + "*"
            for raw_key in self.client.scan_iter(match=pattern, count=500):
                exchange = _text(raw_key)[len(self.keys.key(BINDING_PREFIX)) :]
                for member in self.client.smembers(raw_key):
                    routing_key, _pattern, queue = _text(member).split(self.keys.sep, 2)
                    found.setdefault(exchange, []).append((routing_key, queue))
            self._bindings = found
        return self._bindings

    def route(self, exchange: str, routing_key: str) -> str:
        """The queue a (exchange, routing key) pair delivers to, as kombu's direct routing does."""
        if not exchange:
            return routing_key
        for bound_key, queue in self.bindings().get(exchange, []):
            if bound_key == routing_key:
                return queue
        return routing_key


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def plain_client(
    url: str,
    ssl_options: dict[str, Any] | None,
    timeout: float,
    transport_options: dict[str, Any] | None = None,
) -> redis.Redis:
    """A redis-py client that tries once: redis-py's default retries with backoff for seconds.

    `url` is what Celery got: redis(s)://, or sentinel://h1:p1;sentinel://h2:p2 with the master
    named in `transport_options` (mailworker.redis_client builds both)."""
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if url.startswith("sentinel://"):
        return _sentinel_master(url, transport_options or {}, ssl_options, options)
    if url.startswith("rediss://") and ssl_options:
        options.update(ssl_options)
    return redis.Redis.from_url(url, **options)


def _sentinel_master(
    url: str,
    transport_options: dict[str, Any],
    ssl_options: dict[str, Any] | None,
    options: dict[str, Any],
) -> redis.Redis:
    chunks = [urlsplit(chunk) for chunk in url.split(";") if chunk]
    first = chunks[0]
    # The app's Sentinel options win (one attempt, their shorter timeout; mailworker.redis_client).
    sentinel_kwargs = {**options, **(transport_options.get("sentinel_kwargs") or {})}
    if ssl_options:
        options = {**options, **ssl_options, "ssl": True}
    sentinel = redis.sentinel.Sentinel(
        [(chunk.hostname or "127.0.0.1", chunk.port or 26379) for chunk in chunks],
        sentinel_kwargs=sentinel_kwargs,
    )
    return sentinel.master_for(
        transport_options.get("master_name") or "mymaster",
        db=int(first.path.lstrip("/") or 0),
        username=unquote(first.username) if first.username else None,
        password=unquote(first.password) if first.password else None,
        **options,
    )


def command_timeout(app: Celery) -> float:
    """The timeout make_fast_failing put on this app (kombu's default when it was not called)."""
    return float(app.conf.broker_connection_timeout or 4.0)


@contextmanager
def open_broker(app: Celery) -> Iterator[Broker]:
    """PING the broker's Redis (bounded by the command's timeout) and yield a client on it."""
    url = str(app.conf.broker_url)
    client = plain_client(
        url, app.conf.broker_use_ssl, command_timeout(app), app.conf.broker_transport_options
    )
    try:
        client.ping()
        yield Broker(client=client, keys=BrokerKeys.from_app(app), url=url)
    except CONNECTION_ERRORS as exc:
        raise describe_failure("broker", url, exc) from None
    finally:
        client.close()


def result_backend_client(app: Celery) -> redis.Redis:
    """A PINGed client on the result backend's Redis, or Unreachable."""
    url = str(app.conf.result_backend or app.conf.broker_url)
    if not url.startswith(("redis://", "rediss://", "sentinel://")):
        raise Unreachable(f"the result backend {mask_url(url)} is not Redis; this reads Redis keys")
    client = plain_client(
        url,
        app.conf.redis_backend_use_ssl,
        command_timeout(app),
        app.conf.result_backend_transport_options,
    )
    try:
        client.ping()
    except CONNECTION_ERRORS as exc:
        raise describe_failure("result backend", url, exc) from None
    return client


def decode_json(raw: bytes | str) -> Any:
    """A kombu message or unacked entry as Python data; None when it is not JSON."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
