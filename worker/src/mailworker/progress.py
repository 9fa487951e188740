"""A worker's record of its own progress in Redis, so `mailworker health worker` finds a worker
that answers pings but no longer takes tasks (celery #8030, #8384, #10205: a consumer that lost
its BRPOP, or a queue whose consumption was cancelled).

Every INTERVAL seconds the worker's main process (a timer in its event loop, beside the consumer)
writes one hash per node: when it last received a task, how many run and how many could, the
queues it was started to consume, and since when it has been *starved*: tasks waiting in those
queues, a free slot, and nothing received since the previous record. A consuming worker with a
free slot takes a waiting task within milliseconds, so starvation that lasts WORKER_STUCK_AFTER
seconds means the worker stopped consuming. The health check judges the record; a record that
stopped being written is as bad (the timer runs in the same loop that consumes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final

from celery import bootsteps, signals
from celery.utils.log import get_logger

INTERVAL: Final = 10
KEY_PREFIX: Final = "mailworker:progress:"

logger = get_logger(__name__)

_received = {"at": 0.0}


def progress_key(node: str) -> str:
    return KEY_PREFIX + node


@signals.task_received.connect
def _on_task_received(**_: Any) -> None:
    _received["at"] = time.time()


@dataclass(frozen=True)
class Progress:
    """A worker's last record, as `judge_progress` reads it."""

    recorded_at: float
    received_at: float
    active: int
    concurrency: int
    waiting: int
    queues: tuple[str, ...]
    starved_since: float  # 0: not starved

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> Progress:
        value = {key.decode(): item.decode() for key, item in raw.items()}
        return cls(
            recorded_at=float(value["recorded_at"]),
            received_at=float(value["received_at"]),
            active=int(value["active"]),
            concurrency=int(value["concurrency"]),
            waiting=int(value["waiting"]),
            queues=tuple(filter(None, value["queues"].split(","))),
            starved_since=float(value["starved_since"]),
        )


class ProgressStep(bootsteps.StartStopStep):
    """Consumer bootstep: the progress timer, started and stopped with the consumer."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.tref: Any = None
        self.client: Any = None
        self.queues: tuple[str, ...] = ()
        self.starved_since = 0.0
        self.last_received = 0.0

    def start(self, c: Any) -> None:
        from mailworker.redis_client import redis_from_url  # noqa: PLC0415
        from mailworker.settings import load_settings  # noqa: PLC0415

        settings = load_settings()
        if not self.queues:  # as started (-Q); cancel_consumer deselects from the live list
            self.queues = tuple(sorted(c.app.amqp.queues.consume_from or settings.queues))
        self.client = redis_from_url(settings.broker_url, settings, timeout=5)
        self.node = c.hostname
        self.expire = 3 * settings.worker_stuck_after
        if not _received["at"]:
            _received["at"] = time.time()  # idle since the start
        # At once: a record left by this node's previous process, stopped for a while, would
        # otherwise look like a stuck worker to the health check until the first interval.
        self.record(c)
        self.tref = c.timer.call_repeatedly(INTERVAL, self.record, (c,), priority=10)

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def record(self, c: Any) -> None:
        from celery.worker import state  # noqa: PLC0415

        now = time.time()
        received = _received["at"]
        active = len(state.active_requests)
        concurrency = int(getattr(c.controller, "concurrency", 0) or 0)
        try:
            pipe = self.client.pipeline(transaction=False)
            for queue in self.queues:
                pipe.llen(queue)
            waiting = sum(pipe.execute())
            starved = waiting > 0 and active < concurrency and received <= self.last_received
            if not starved:
                self.starved_since = 0.0
            elif not self.starved_since:
                self.starved_since = now
            self.last_received = received
            key = progress_key(self.node)
            self.client.pipeline(transaction=False).hset(
                key,
                mapping={
                    "recorded_at": now,
                    "received_at": received,
                    "active": active,
                    "concurrency": concurrency,
                    "waiting": waiting,
                    "queues": ",".join(self.queues),
                    "starved_since": self.starved_since,
                },
            ).expire(key, self.expire).execute()
        except Exception as error:  # a timer callback must not stop the worker's event loop
            logger.warning("could not record this worker's progress in Redis: %s", error)


def judge_progress(progress: Progress | None, *, now: float, stuck_after: int) -> str | None:
    """None when the record shows progress (or there is none yet); else why the worker is
    stuck."""
    if progress is None:
        return None
    age = now - progress.recorded_at
    if age > stuck_after:
        return f"recorded no progress for {age:.0f} s (limit {stuck_after} s)"
    if progress.starved_since and now - progress.starved_since > stuck_after:
        return (
            f"takes no tasks: {progress.waiting} waiting in {','.join(progress.queues)}, "
            f"{progress.concurrency - progress.active} of {progress.concurrency} slots free, "
            f"nothing received for {now - progress.received_at:.0f} s (limit {stuck_after} s)"
        )
    return None
