"""Queue depth, unacknowledged messages and purge, read straight from the broker's Redis.

kombu keeps each queue as Redis lists (one per priority step) and every message a worker has
taken but not acknowledged in the `unacked` hash (tag -> [message, exchange, routing_key]) with
its delivery time in the `unacked_index` sorted set. Those are what this module counts.
"""

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from time import time
from typing import Any

from celery import Celery

from mailworker.ops.broker import Broker, decode_json
from mailworker.ops.errors import BadInput

INTERNAL_EXCHANGE_SUFFIXES = (".pidbox",)
INTERNAL_EXCHANGES = frozenset({"celeryev"})


@dataclass(frozen=True)
class QueueDepth:
    """One queue as Redis sees it right now."""

    queue: str
    messages: int  # waiting, not yet delivered to any worker
    unacked: int  # delivered to a worker and not acknowledged yet
    overdue: int  # unacked longer than the visibility timeout: Redis will redeliver them
    configured: bool  # in the app's task_queues (False: found only in Redis)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def configured_queues(app: Celery) -> list[str]:
    """Queue names the app declares (task_queues), in declaration order."""
    declared = app.conf.task_queues
    if declared:
        return [q.name for q in declared]
    return [str(app.conf.task_default_queue)]


def is_internal(exchange: str) -> bool:
    """Celery's own control (pidbox) and event exchanges: never task queues."""
    return exchange in INTERNAL_EXCHANGES or exchange.endswith(INTERNAL_EXCHANGE_SUFFIXES)


def bound_queues(broker: Broker) -> set[str]:
    """Task queues that some consumer has declared in this Redis (kombu bindings)."""
    return {
        queue
        for exchange, members in broker.bindings().items()
        if not is_internal(exchange)
        for _routing_key, queue in members
    }


def all_queues(app: Celery, broker: Broker) -> list[str]:
    """Configured queues first, then any other task queue Redis knows about."""
    configured = configured_queues(app)
    extra = sorted(bound_queues(broker) - set(configured))
    return configured + extra


def require_queue(app: Celery, broker: Broker, name: str) -> None:
    """BadInput unless the queue is configured or bound in Redis."""
    known = all_queues(app, broker)
    if name not in known:
        raise BadInput(f"unknown queue {name!r} (known: {', '.join(known)})")


def messages_waiting(broker: Broker, queue: str) -> int:
    pipe = broker.client.pipeline(transaction=False)
    for key in broker.keys.queue_keys(queue):
        pipe.llen(key)
    return sum(int(n) for n in pipe.execute())


def unacked_by_queue(broker: Broker) -> tuple[Counter[str], Counter[str]]:
    """(unacked, overdue) counts per queue, from the unacked hash and its time index."""
    unacked: Counter[str] = Counter()
    overdue: Counter[str] = Counter()
    deadline = time() - broker.keys.visibility_timeout
    index_key = broker.keys.key(broker.keys.unacked_index_key)
    tags: list[bytes] = []
    queues: list[str] = []
    for tag, raw in broker.client.hscan_iter(broker.keys.key(broker.keys.unacked_key), count=500):
        entry = decode_json(raw)
        if isinstance(entry, list) and len(entry) == 3:  # noqa: PLR2004 ([message, ex, rk])
            queue = broker.route(str(entry[1] or ""), str(entry[2] or ""))
        else:
            queue = "?"
        unacked[queue] += 1
        tags.append(tag)
        queues.append(queue)
    pipe = broker.client.pipeline(transaction=False)
    for tag in tags:
        pipe.zscore(index_key, tag)
    for queue, delivered in zip(queues, pipe.execute() if tags else [], strict=True):
        if delivered is not None and delivered < deadline:
            overdue[queue] += 1
    return unacked, overdue


def queue_depths(
    app: Celery, broker: Broker, names: Iterable[str] | None = None
) -> list[QueueDepth]:
    """Depth of every queue (or of `names`), with unacked messages attributed to their queue."""
    configured = set(configured_queues(app))
    queues = list(names) if names is not None else all_queues(app, broker)
    unacked, overdue = unacked_by_queue(broker)
    rows = [
        QueueDepth(
            queue=q,
            messages=messages_waiting(broker, q),
            unacked=unacked.pop(q, 0),
            overdue=overdue.pop(q, 0),
            configured=q in configured,
        )
        for q in queues
    ]
    if names is None:
        # Unacked messages of a queue that no longer exists still matter to an operator.
        rows += [
            QueueDepth(queue=q, messages=0, unacked=n, overdue=overdue[q], configured=False)
            for q, n in sorted(unacked.items())
        ]
    return rows


def purge_queue(broker: Broker, queue: str) -> int:
    """Delete every waiting message of the queue (all priority lists); return how many."""
    pipe = broker.client.pipeline(transaction=True)
    for key in broker.keys.queue_keys(queue):
        pipe.llen(key)
        pipe.delete(key)
    results = pipe.execute()
    return sum(int(n) for n in results[::2])


def message_summary(raw: bytes | str) -> dict[str, Any] | None:
    """id, task name and ETA of a queued Celery message (protocol 2 headers)."""
    message = decode_json(raw)
    if not isinstance(message, dict):
        return None
    headers = message.get("headers") or {}
    return {"id": headers.get("id"), "task": headers.get("task"), "eta": headers.get("eta")}


def find_queued(broker: Broker, queues: Iterable[str], task_id: str, limit: int) -> str | None:
    """The queue in which task_id waits, scanning at most `limit` messages per queue."""
    page = 500
    for queue in queues:
        for key in broker.keys.queue_keys(queue):
            for start in range(0, limit, page):
                chunk = broker.client.lrange(key, start, min(start + page, limit) - 1)
                if not chunk:
                    break
                for raw in chunk:
                    if task_id.encode() in (raw if isinstance(raw, bytes) else raw.encode()):
                        summary = message_summary(raw)
                        if summary and summary["id"] == task_id:
                            return queue
    return None


def find_unacked(broker: Broker, task_id: str) -> str | None:
    """The queue of an unacknowledged message carrying task_id, if one exists."""
    for _tag, raw in broker.client.hscan_iter(broker.keys.key(broker.keys.unacked_key), count=500):
        entry = decode_json(raw)
        if not (isinstance(entry, list) and len(entry) == 3):  # noqa: PLR2004
            continue
        headers = (entry[0] or {}).get("headers") or {} if isinstance(entry[0], dict) else {}
        if headers.get("id") == task_id:
            return broker.route(str(entry[1] or ""), str(entry[2] or ""))
    return None
