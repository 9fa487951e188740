"""The baseline: a Celery app with only the broker URL set, so every other setting is Celery's."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("bench", broker=os.environ["BENCH_BROKER_URL"], include=["bench.tasks"])
