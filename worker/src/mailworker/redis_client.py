"""How every process reaches Redis: Celery's URLs and options, and plain clients beside Celery.

One place turns the settings into connections, so the broker, the result backend, beat's lease,
Flower, the health checks and the CLI all follow the same master: the broker URL's host, or,
with MAILWORKER_REDIS_SENTINELS, whichever master the Sentinels name. The URL's scheme, user,
password and database apply either way. `monitor=True` swaps in the monitoring ACL user
(MAILWORKER_MONITOR_REDIS_USER), which Flower and `mailworker health` use.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import redis
import redis.sentinel

from mailworker.settings import Settings


def with_credentials(url: str, user: str, password: str) -> str:
    """`url` with another user and password (host, port and database kept)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def settings_url(url: str, settings: Settings, *, monitor: bool = False) -> str:
    """The redis(s):// URL of the settings with the monitoring user's credentials if asked."""
    if monitor and settings.monitor_redis_user:
        return with_credentials(url, settings.monitor_redis_user, settings.monitor_redis_password)
    return url


def celery_url(url: str, settings: Settings, *, monitor: bool = False) -> str:
    """What Celery and kombu get: the URL itself, or kombu's `sentinel://h1:p1;sentinel://h2:p2`
    form with the URL's credentials and database on every address: kombu starts from the first
    but, after a connection error, moves to the next address and takes its credentials (none
    would fail to authenticate on the new master)."""
    url = settings_url(url, settings, monitor=monitor)
    if not settings.redis_sentinels:
        return url
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    chunks = []
    for host, port in settings.redis_sentinels:
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if userinfo:
            netloc = f"{userinfo}@{netloc}"
        chunks.append(urlunsplit(("sentinel", netloc, parts.path or "/0", "", "")))
    return ";".join(chunks)


def tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's TLS options for rediss:// (the same for Celery and the plain clients)."""
    options: dict[str, Any] = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED if settings.redis_tls_verify else ssl.CERT_NONE,
    }
    if settings.redis_ca_file:
        options["ssl_ca_certs"] = settings.redis_ca_file
    return options


# A Sentinel answers from memory in milliseconds. A longer wait only delays asking the next one
# when a Sentinel's host froze, and every pool kombu opens asks the first-listed Sentinel again.
SENTINEL_TIMEOUT = 2.0


def sentinel_options(settings: Settings, *, timeout: float) -> dict[str, Any]:
    """kombu's and Celery's transport options naming the master and how to reach the Sentinels
    (empty without Sentinels). redis-py copies the socket timeouts to the Sentinel connections
    only when no sentinel_kwargs are given, so they are set here too: `timeout`, at most
    SENTINEL_TIMEOUT."""
    if not settings.redis_sentinels:
        return {}
    timeout = min(timeout, SENTINEL_TIMEOUT)
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # One attempt per Sentinel: the next Sentinel is the retry. redis-py's default Retry
        # (10 retries, each waiting the socket timeout) held discovery on a frozen Sentinel
        # for 11 timeouts before asking the next one; None gives its connections no retry.
        "retry": None,
    }
    if settings.redis_sentinel_password:
        sentinel_kwargs["password"] = settings.redis_sentinel_password
    if settings.broker_url.startswith("rediss://"):
        sentinel_kwargs.update(ssl=True, **tls_options(settings))
    return {"master_name": settings.redis_master_name, "sentinel_kwargs": sentinel_kwargs}


def redis_from_url(
    url: str,
    settings: Settings,
    *,
    timeout: float = 10.0,
    monitor: bool = False,
    **extra: Any,
) -> redis.Redis:
    """A client on the Redis of `url` (a redis(s):// settings URL) with Celery's TLS
    verification; with Sentinels, on the master they name, following a failover."""
    url = settings_url(url, settings, monitor=monitor)
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    options.update(extra)
    tls = url.startswith("rediss://")
    if tls:
        options.update(tls_options(settings))
    if not settings.redis_sentinels:
        return redis.Redis.from_url(url, **options)
    parts = urlsplit(url)
    sentinel = redis.sentinel.Sentinel(
        list(settings.redis_sentinels),
        sentinel_kwargs=sentinel_options(settings, timeout=timeout)["sentinel_kwargs"],
    )
    if tls:
        options["ssl"] = True
    return sentinel.master_for(
        settings.redis_master_name,
        db=int(parts.path.lstrip("/") or 0),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        **options,
    )
