"""The same-guarantees baseline (issue 12): Celery configured by hand for what the shipped worker
promises, and nothing of mailworker.

At-least-once delivery, task events for a monitor such as Flower, and results stored in Redis.
Pool, concurrency, prefetch, queues and log level come on the command line, copied from the
shipped units (bench.configs.same_guarantees); every other setting is Celery's default. Left out
is what the project adds: leases on unacknowledged tasks (mailworker.redis_transport), progress
records, tenant checks and task ledgers.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery(
    "bench",
    broker=os.environ["BENCH_BROKER_URL"],
    # Its own Redis database, as the shipped worker keeps results apart from the queues.
    backend=os.environ["BENCH_RESULT_BACKEND"],
    include=["bench.tasks"],
)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_send_task_events=True,
    # Published by the producer: a monitor shows a task while it is still queued.
    task_send_sent_event=True,
)
