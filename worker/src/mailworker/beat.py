"""Beat's scheduler: Celery's persistent scheduler plus a heartbeat in Redis.

`mailworker health beat` reads the heartbeat; a beat that hangs or lost Redis stops refreshing
it, which a process check alone would not notice.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery.beat import PersistentScheduler

from mailworker.redis_client import redis_from_url
from mailworker.settings import load_settings

HEARTBEAT_KEY = "mailworker:beat:heartbeat"

logger = logging.getLogger(__name__)


class HeartbeatScheduler(PersistentScheduler):
    """Writes the time of every tick to HEARTBEAT_KEY in the broker's Redis."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._redis: redis.Redis | None = None
        self._heartbeat_ttl = 3600
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        super().setup_schedule()
        settings = load_settings()
        self._redis = redis_from_url(settings.broker_url, settings, timeout=5.0)
        # The key outlives a few missed ticks, then disappears, so a long-dead beat reads as
        # "no heartbeat" rather than as an old one forever.
        self._heartbeat_ttl = settings.beat_heartbeat_max_age * 10

    def tick(self, *args: Any, **kwargs: Any) -> float:
        interval = super().tick(*args, **kwargs)
        self.write_heartbeat()
        return interval

    def write_heartbeat(self) -> None:
        if self._redis is None:
            return
        try:
            self._redis.set(HEARTBEAT_KEY, f"{time.time():.3f}", ex=self._heartbeat_ttl)
        except redis.RedisError as error:
            # Beat keeps scheduling (Celery reconnects the broker itself); the stale heartbeat
            # is what makes the health check report the trouble.
            logger.warning("beat heartbeat not written: %s", error)


def heartbeat_age(client: redis.Redis) -> float | None:
    """Seconds since beat's last tick, or None when there is no heartbeat."""
    raw = client.get(HEARTBEAT_KEY)
    if raw is None:
        return None
    return max(0.0, time.time() - float(raw))
