"""What `mailworker clean` removes, planned first so the operator sees it before anything goes.

Each step knows how much it would remove and how to remove it. Redis is never flushed whole:
the broker database also holds kombu's queue bindings (publishing needs them) and beat's lease,
last runs and heartbeats, so only queued messages, orphaned unacked entries and task results go.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from celery import Celery

from mailworker.ops.broker import Broker
from mailworker.ops.queues import all_queues, messages_waiting, purge_queue

DEFAULT_LOG_DIR = Path("/var/log/mailworker")
SCAN_BATCH = 500


@dataclass(frozen=True)
class Step:
    """One thing `clean` removes: what, how much (in `unit`), and the call that removes it."""

    target: str
    amount: int
    unit: str
    action: Callable[[], int]
    note: str = ""


def _rotated(path: Path) -> bool:
    """worker.log.1, worker.log.2.gz, worker.log-20240101: what logrotate leaves behind."""
    return ".log." in path.name or ".log-" in path.name or path.suffix == ".gz"


def plan_logs(log_dir: Path) -> list[Step]:
    """Truncate current *.log files (the services keep them open) and delete rotated ones."""
    if not log_dir.is_dir():
        return []
    steps: list[Step] = []
    for path in sorted(p for p in log_dir.iterdir() if p.is_file()):
        size = path.stat().st_size
        if path.suffix == ".log":
            steps.append(Step(f"truncate {path}", size, "bytes", _truncate(path)))
        elif _rotated(path):
            steps.append(Step(f"delete {path}", size, "bytes", _delete(path)))
    return steps


def _truncate(path: Path) -> Callable[[], int]:
    def run() -> int:
        size = path.stat().st_size
        with path.open("r+b") as handle:
            handle.truncate(0)
        return size

    return run


def _delete(path: Path) -> Callable[[], int]:
    def run() -> int:
        size = path.stat().st_size
        path.unlink()
        return size

    return run


def _scan(client: redis.Redis, pattern: str) -> Iterator[bytes]:
    yield from client.scan_iter(match=pattern, count=SCAN_BATCH)


def _delete_matching(client: redis.Redis, patterns: list[str]) -> Callable[[], int]:
    def run() -> int:
        deleted = 0
        for pattern in patterns:
            batch: list[bytes] = []
            for key in _scan(client, pattern):
                batch.append(key)
                if len(batch) >= SCAN_BATCH:
                    deleted += int(client.unlink(*batch))
                    batch = []
            if batch:
                deleted += int(client.unlink(*batch))
        return deleted

    return run


def plan_results(app: Celery, client: redis.Redis) -> list[Step]:
    """Delete every stored task, group and chord result from the result backend."""
    backend = app.backend
    prefixes = [backend.task_keyprefix, backend.group_keyprefix, backend.chord_keyprefix]
    patterns = [(p.decode() if isinstance(p, bytes) else str(p)) + "*" for p in prefixes]
    count = sum(1 for pattern in patterns for _ in _scan(client, pattern))
    return [
        Step(
            "task results in the result backend", count, "keys", _delete_matching(client, patterns)
        )
    ]


def plan_redis(app: Celery, broker: Broker, workers_online: list[str]) -> list[Step]:
    """Purge every task queue; drop unacked entries only when no worker could be holding them."""
    steps = [
        Step(f"purge queue {q}", messages_waiting(broker, q), "messages", _purge(broker, q))
        for q in all_queues(app, broker)
    ]
    unacked_key = broker.keys.key(broker.keys.unacked_key)
    index_key = broker.keys.key(broker.keys.unacked_index_key)
    unacked = int(broker.client.hlen(unacked_key))
    if workers_online:
        steps.append(
            Step(
                "unacked messages",
                0,
                "messages",
                lambda: 0,
                note=f"kept {unacked}: workers are online ({', '.join(workers_online)}); "
                "stop them first to drop these",
            )
        )
    else:
        steps.append(
            Step(
                "unacked messages (no worker online)",
                unacked,
                "messages",
                _drop_unacked(broker.client, unacked_key, index_key),
            )
        )
    return steps


def _drop_unacked(client: redis.Redis, unacked_key: str, index_key: str) -> Callable[[], int]:
    def run() -> int:
        pipe = client.pipeline(transaction=True)
        pipe.hlen(unacked_key)
        pipe.delete(unacked_key, index_key)
        count, _deleted = pipe.execute()
        return int(count)

    return run


def _purge(broker: Broker, queue: str) -> Callable[[], int]:
    return lambda: purge_queue(broker, queue)
