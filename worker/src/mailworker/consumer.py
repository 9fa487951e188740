"""Celery's worker consumer, publishing its buffered task events at most every EVENTS_FLUSH_EVERY.

Celery buffers task events (received, started, succeeded, ...) and asks the event loop to flush
the buffer after each one, so under load nearly every task costs a publish of its own (1.3
publishes per no-op task measured, docs/benchmarks.md). This consumer flushes at once when the
previous flush is older than EVENTS_FLUSH_EVERY, and otherwise once that much time has passed,
so events reach Flower at most that late; Celery still flushes a buffer that reaches its limit
(24 events) at once. Only events are delayed: acks, results and the task ledger are not.
"""

from __future__ import annotations

import time
from typing import Any, Final

from celery.utils.log import get_logger
from celery.worker.consumer import Consumer as CeleryConsumer

EVENTS_FLUSH_EVERY: Final = 0.5  # seconds

logger = get_logger(__name__)


class Consumer(CeleryConsumer):  # type: ignore[misc]
    _events_flushed_at = 0.0
    _events_flush_timer: Any = None

    def _flush_events(self) -> None:
        """Runs in the event loop's thread (Celery's consumer schedules it with call_soon)."""
        timer = self._events_flush_timer
        if timer is not None and not timer.canceled:
            return  # a flush is due already (one cancelled elsewhere is not: a new one is set)
        wait = self._events_flushed_at + EVENTS_FLUSH_EVERY - time.monotonic()
        if wait > 0 and self.hub is not None:
            self._events_flush_timer = self.hub.call_later(wait, self._flush_events_now)
            return
        self._flush_events_now()

    def _flush_events_now(self) -> None:
        self._events_flush_timer = None
        self._events_flushed_at = time.monotonic()
        super()._flush_events()

    def shutdown(self) -> None:
        # A warm shutdown's last events (its tasks' succeeded) must not wait for a timer that
        # will not fire.
        if self._events_flush_timer is not None:
            self._events_flush_timer.cancel()
            self._events_flush_timer = None
        if self.event_dispatcher is not None:
            try:
                self.event_dispatcher.flush()
            except Exception as error:  # events are monitoring: the shutdown goes on
                logger.warning("task events not published at shutdown: %s", error)
        super().shutdown()
