"""Plain Redis clients for what Celery does not do itself (beat's lease, result cleanup)."""

from __future__ import annotations

import ssl
from typing import Any

import redis

from mailworker.settings import Settings


def redis_from_url(url: str, settings: Settings, *, timeout: float = 10.0) -> redis.Redis:
    """A client for `url` with the same TLS verification as Celery's."""
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if url.startswith("rediss://"):
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED if settings.redis_tls_verify else ssl.CERT_NONE
        if settings.redis_ca_file:
            options["ssl_ca_certs"] = settings.redis_ca_file
    return redis.Redis.from_url(url, **options)
